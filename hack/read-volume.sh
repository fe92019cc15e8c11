#!/usr/bin/env bash
# The workload's own read volume (issue 13): how much of its root filesystem
# the command of image TAG (from hack/build-images.sh) reads until it exits,
# with no lazy loading in the way, as the floor for what a lazy pull must
# move before the first output.
#
#   hack/read-volume.sh TAG [IMAGES_DIR]     (default /var/tmp/lazybd-images)
#
# How: `umoci unpack` the image (all layers applied), the rootfs as ONE
# uncompressed EROFS image (mkfs.erofs) on a read-only loop device, mounted;
# the image's command (args, env, cwd from its config) runs in a chroot of it
# with /proc, the host's /dev and a tmpfs /tmp. The loop device's sectors
# read (/sys/block/loopN/stat, field 3) are counted from just before the
# command to its exit, once each with read_ahead_kb 0 (what the workload
# itself reads), 128 and 4096 (for reference); before each run the
# filesystem is mounted afresh and the page cache dropped. The first output
# line must be `ready`.
#
# Prints one tab-separated line on stdout:
#   TAG  BYTES_RA0  BYTES_RA128  BYTES_RA4096  LAYERS_COMPRESSED  LAYERS_UNCOMPRESSED
# the last two the sums of the image's layer blobs and of their uncompressed
# tar streams: their ratio is the layers' compression ratio, so
# BYTES_RA0 * LAYERS_COMPRESSED / LAYERS_UNCOMPRESSED estimates the workload's
# read volume as compressed bytes on the wire. Progress goes to stderr.
# Needs root (loop device, mount, chroot). Cleans up its mounts, loop device
# and scratch directory on exit. Takes ~20 s for python.
set -euo pipefail

die() { echo "read-volume: $*" >&2; exit 1; }
log() { echo "read-volume: $*" >&2; }

[ "$(id -u)" = 0 ] || die "must run as root (losetup, mount, chroot)"
case $# in 1 | 2) ;; *) die "usage: $0 TAG [IMAGES_DIR]" ;; esac
TAG=$1
LAYOUT=${2:-/var/tmp/lazybd-images}/layout
[ -f "$LAYOUT/index.json" ] || die "no OCI layout at $LAYOUT (run hack/build-images.sh)"
for t in umoci mkfs.erofs losetup jq chroot; do
  command -v "$t" >/dev/null || die "$t not found (hack/install-deps.sh installs it)"
done

WORK=$(mktemp -d /var/tmp/lazybd-readvol.XXXXXX)
MNT=$WORK/mnt
LOOP=

# Mount points at or under $1, deepest first.
mounts_under() {
  awk -v d="$1" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo | sort -r
}
unmount_all() {
  local m
  for m in $(mounts_under "$MNT"); do umount "$m" 2>/dev/null || umount -l "$m"; done
}
cleanup() {
  set +e
  unmount_all
  [ -n "$LOOP" ] && losetup -d "$LOOP"
  if [ -z "$(mounts_under "$WORK")" ]; then
    rm -rf --one-file-system "$WORK"
  else
    echo "read-volume: still mounted under $WORK, left in place" >&2
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

blob() { echo "$LAYOUT/blobs/${1%%:*}/${1#*:}"; }
manifest=$(jq -r --arg t "$TAG" '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == $t) | .digest' \
  "$LAYOUT/index.json" | head -n1)
[ -n "$manifest" ] || die "no image $TAG in $LAYOUT"

compressed=0
uncompressed=0
for d in $(jq -r '.layers[].digest' "$(blob "$manifest")"); do
  compressed=$((compressed + $(stat -c %s "$(blob "$d")")))
  uncompressed=$((uncompressed + $(gzip -dc "$(blob "$d")" | wc -c)))
done

log "$TAG: unpacking and making one EROFS image of its rootfs"
umoci unpack --image "$LAYOUT:$TAG" "$WORK/bundle" >/dev/null
mapfile -t args < <(jq -r '.process.args[]' "$WORK/bundle/config.json")
mapfile -t env < <(jq -r '.process.env[]' "$WORK/bundle/config.json")
cwd=$(jq -r '.process.cwd' "$WORK/bundle/config.json")
for d in proc dev tmp; do
  [ -d "$WORK/bundle/rootfs/$d" ] || die "$TAG: the rootfs has no /$d to mount on"
done
mkfs.erofs --quiet "$WORK/rootfs.erofs" "$WORK/bundle/rootfs" >/dev/null
rm -rf --one-file-system "$WORK/bundle"
LOOP=$(losetup -f --show -r "$WORK/rootfs.erofs")
dev=${LOOP#/dev/}
mkdir -p "$MNT"

sectors_read() { awk '{ print $3 }' "/sys/block/$dev/stat"; }

# Bytes the device read while the workload ran with readahead $1 KiB.
measure() {
  local ra=$1 before after out rc=0
  echo "$ra" >"/sys/block/$dev/queue/read_ahead_kb"
  mount -t erofs -o ro "$LOOP" "$MNT"
  mount -t proc proc "$MNT/proc"
  mount --bind /dev "$MNT/dev"
  mount -t tmpfs -o mode=1777 tmpfs "$MNT/tmp"
  sync
  echo 3 >/proc/sys/vm/drop_caches
  before=$(sectors_read)
  # shellcheck disable=SC2016 # $0 and $@ are for the inner sh
  out=$(timeout -k 5 120 chroot "$MNT" /usr/bin/env -i "${env[@]}" \
    /bin/sh -c 'cd "$0" && exec "$@"' "$cwd" "${args[@]}" 2>&1 </dev/null) || rc=$?
  after=$(sectors_read)
  unmount_all
  if [ $rc != 0 ] || [ "${out%%$'\n'*}" != ready ]; then
    printf '%s\n' "$out" | head -n 20 >&2
    die "$TAG: '${args[*]}' exited $rc, first line '${out%%$'\n'*}' (want 'ready')"
  fi
  log "$TAG: read_ahead_kb $ra: $(((after - before) * 512)) bytes read"
  echo $(((after - before) * 512))
}

ra0=$(measure 0)
ra128=$(measure 128)
ra4096=$(measure 4096)
printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$TAG" "$ra0" "$ra128" "$ra4096" "$compressed" "$uncompressed"
