#!/usr/bin/env bash
# Builds the cold-start benchmark images (issue 7, HelloBench style) from
# Debian packages, as OCI images, since no public registry is reachable.
#
#   hack/build-images.sh [OUT_DIR]        (default /var/tmp/lazybd-images)
#
# Output: ONE OCI image layout, OUT_DIR/layout, with the tags
#   python  python3 (Debian's 3.11) runs /app/start.py
#   node    nodejs (Debian's 18) runs /app/start.js
#   large   gcc, g++, gfortran; /app/start.sh compiles and runs a hello world
#   base    the shared base (debootstrap --variant=minbase bookworm); the three
#           images above are this one layer plus one layer of their own, so
#           the base layer blob is stored (and pushed) once.
# Use one with e.g. `skopeo copy oci:OUT_DIR/layout:python docker://...`.
# Each workload prints `ready` as its FIRST output, only after it has done its
# work, so "time to first output" measures the real start. Every image is
# run once here (umoci unpack + chroot) and the build fails unless its first
# line of output is `ready`.
#
# How: debootstrap into a directory (cached as OUT_DIR/cache/base-rootfs.tar,
# built once), copy it into a bundle of an empty image and `umoci repack` it
# as the base layer; per image, `umoci unpack` the base, apt-get install in a
# chroot of its rootfs (/proc mounted, /dev bound, resolv.conf copied; all
# unmounted again, also on failure), add /app, and `umoci repack` the diff;
# that diff, with an entry added for each parent directory of its entries that
# it lacks (copied from the base layer: hack/lib/layer-parents.py), becomes the
# image's second layer (`umoci raw add-layer`). Every layer thus has the parent
# directories of its entries, which `ctr-remote image optimize` (stargz)
# needs to put the files read at start first; the check verifies it.
# /dev is left empty in the image (a runtime mounts
# its own), as are /etc/resolv.conf and /etc/hostname; apt lists and caches
# are removed.
#
# Cached and idempotent: OUT_DIR/stamps/<tag>.stamp records a hash of that
# image's recipe (packages, workload, config, and the code of this script
# that builds it) and the manifest digest it produced; a run with everything
# up to date only prints the summary. Changing a recipe rebuilds that image
# (the base recipe: everything). Delete OUT_DIR to start over.
#
# Network: debootstrap and apt-get need the Debian mirror, deb.debian.org
# (MIRROR below); that is the one step that does. A second run needs nothing.
# Needs root (debootstrap, chroot, mount). Installs nothing itself except
# through hack/install-deps.sh (debootstrap, umoci, jq; tar and coreutils).
#
# Measured on Debian bookworm x86_64, 2 cores, 23 GiB (2026-12-01, mirror
# over the network). MiB = 2^20 bytes; "compressed" is the sum of the image's
# gzip layer blobs (the shared base layer included), "uncompressed" its rootfs
# (du --apparent-size):
#   tag     layers  compressed (own layer)   uncompressed rootfs
#   base    1        48.7 MiB                114.3 MiB
#   python  2        65.1 MiB (16.4 MiB)     157.3 MiB
#   node    2        83.8 MiB (35.1 MiB)     208.8 MiB
#   large   2       158.5 MiB (109.8 MiB)    409.6 MiB
# The layout holds all four in 211 MiB. Build time: first run 3m58s
# (debootstrap and the base layer ~2m, then 30-60s per image, each check under a
# second); second run 1.2s (nothing to do); one changed image recipe ~40s.
set -euo pipefail

die() { echo "build-images: $*" >&2; exit 1; }
log() { echo "build-images: $*" >&2; }

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot, mount)"
[ $# -le 1 ] || die "usage: $0 [OUT_DIR]"
OUT=$(realpath -m "${1:-/var/tmp/lazybd-images}")
cd "$(dirname "$0")/.."

SUITE=bookworm
MIRROR=http://deb.debian.org/debian
LAYOUT=$OUT/layout
BASE_TAR=$OUT/cache/base-rootfs.tar
IMG_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
TAGS=(python node large)
declare -A PKGS=(
  [python]="python3"
  [node]="nodejs"
  [large]="gcc g++ gfortran libc6-dev"
)
declare -A CMD=(
  [python]="python3 /app/start.py"
  [node]="node /app/start.js"
  [large]="/bin/sh /app/start.sh"
)
declare -A WORKLOAD_FILE=(
  [python]=/app/start.py
  [node]=/app/start.js
  [large]=/app/start.sh
)

# The workloads. Each prints `ready` first and only after its work.
workload_python() {
  cat <<'PY'
import argparse
import asyncio
import csv
import decimal
import email.mime.text
import http.client
import io
import json
import logging
import sqlite3
import unittest
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET

parser = argparse.ArgumentParser(description="lazybd cold-start workload")
parser.add_argument("--rows", type=int, default=100)
args = parser.parse_args([])

logging.basicConfig(stream=io.StringIO(), level=logging.INFO)
logging.getLogger("start").info("starting")

db = sqlite3.connect(":memory:")
db.execute("create table t (id integer primary key, price text)")
db.executemany("insert into t (price) values (?)",
               [(str(decimal.Decimal(i) / 7),) for i in range(args.rows)])
(count,) = db.execute("select count(*) from t").fetchone()

out = io.StringIO()
csv.writer(out).writerows(db.execute("select id, price from t limit 5"))
root = ET.fromstring("<a><b n='1'/><b n='2'/></a>")
msg = email.mime.text.MIMEText(json.dumps({"count": count, "csv": out.getvalue()}))
req = urllib.request.Request("http://localhost/?" + urllib.parse.urlencode({"q": 1}))


async def tick():
    await asyncio.sleep(0)
    return len(root.findall("b"))


assert asyncio.run(tick()) == 2 and count == args.rows
assert http.client.OK == 200 and req.host == "localhost" and msg.as_string()
assert unittest.TestCase("run").assertTrue(True) is None
print("ready", flush=True)
PY
}

workload_node() {
  cat <<'JS'
'use strict';
const http = require('http');
const crypto = require('crypto');
const zlib = require('zlib');
const fs = require('fs');
const path = require('path');
const url = require('url');
const util = require('util');
const stream = require('stream');

async function main() {
  const buf = Buffer.from('lazybd cold start '.repeat(512));
  const digest = crypto.createHash('sha256').update(buf).digest('hex');
  const gz = zlib.gzipSync(buf);
  if (!zlib.gunzipSync(gz).equals(buf)) throw new Error('gzip round trip');
  const chunks = [];
  await stream.promises.pipeline(
    stream.Readable.from([gz]),
    zlib.createGunzip(),
    new stream.Writable({ write(c, _e, cb) { chunks.push(c); cb(); } }));
  if (Buffer.concat(chunks).length !== buf.length) throw new Error('stream');
  const self = fs.readFileSync(path.join(__dirname, path.basename(__filename)));
  const u = new url.URL('http://localhost/start?x=1');
  const line = util.format('%s %d %s %s', digest, self.length, u.searchParams.get('x'),
                           http.STATUS_CODES[200]);
  if (!line.includes('OK')) throw new Error('util.format');
  console.log('ready');
}
main().catch((e) => { console.error(e); process.exit(1); });
JS
}

workload_large() {
  cat <<'SH'
#!/bin/sh
# Compiles and runs a hello world; prints `ready` after (gcc reads a small
# part of the image: cc1, as, ld, crt files, libc headers).
set -e
d=$(mktemp -d /tmp/hello.XXXXXX)
cat > "$d/hello.c" <<'C'
#include <stdio.h>
int main(void) { return puts("hello") == EOF; }
C
gcc -O2 -o "$d/hello" "$d/hello.c"
out=$("$d/hello")
rm -rf "$d"
[ "$out" = hello ]
echo ready
SH
}

# --- mounts -----------------------------------------------------------------

# Mount points at or under $1, deepest first.
mounts_under() {
  awk -v d="$1" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo | sort -r
}
unmount_under() {
  local m
  for m in $(mounts_under "$1"); do umount "$m" 2>/dev/null || umount -l "$m"; done
  [ -z "$(mounts_under "$1")" ] || die "could not unmount everything under $1"
}
# /proc and the host's /dev for a chroot into $1 (undone by unmount_under).
mount_chroot() {
  mount -t proc proc "$1/proc"
  mount --bind /dev "$1/dev"
}
# Removes a work directory; never while anything is mounted under it (a bound
# /dev would otherwise lose the host's device nodes).
remove_dir() {
  [ -e "$1" ] || return 0
  unmount_under "$1"
  rm -rf --one-file-system "$1"
}

WORK=
cleanup() {
  local rc=$?
  if [ -n "$WORK" ]; then
    # Not through die: keep the original exit status and message.
    for m in $(mounts_under "$WORK"); do umount "$m" 2>/dev/null || umount -l "$m" || true; done
    if [ -n "$(mounts_under "$WORK")" ]; then
      echo "build-images: still mounted under $WORK, left in place" >&2
    else
      rm -rf --one-file-system "$WORK"
    fi
  fi
  [ $rc = 0 ] || echo "build-images: FAILED (exit $rc)" >&2
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- layout helpers -----------------------------------------------------------

# The manifest digest of tag $1 in the layout, empty if there is none.
manifest_of() {
  [ -f "$LAYOUT/index.json" ] || return 0
  jq -r --arg t "$1" '(.manifests // [])[] | select(.annotations["org.opencontainers.image.ref.name"] == $t) | .digest' \
    "$LAYOUT/index.json" | head -n1
}
blob() { echo "$LAYOUT/blobs/${1%%:*}/${1#*:}"; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
sha() { sha256sum | cut -c1-64; }

stamp_file() { echo "$OUT/stamps/$1.stamp"; }
# Whether tag $1 was built from key $2 and is still the manifest it produced.
stamp_ok() {
  local f m
  f=$(stamp_file "$1")
  [ -f "$f" ] || return 1
  m=$(manifest_of "$1")
  [ -n "$m" ] && grep -qx "key=$2" "$f" && grep -qx "manifest=$m" "$f"
}
write_stamp() { # tag key rootfs_bytes
  local f
  f=$(stamp_file "$1")
  printf 'key=%s\nmanifest=%s\nrootfs_bytes=%s\nbuilt=%s\n' \
    "$2" "$(manifest_of "$1")" "$3" "$(date -u +%FT%TZ)" >"$f.tmp"
  mv "$f.tmp" "$f"
}
rootfs_bytes() { du -sx --apparent-size --block-size=1 "$1" | cut -f1; }

# --- the base ---------------------------------------------------------------

base_recipe() {
  echo "base v1 $SUITE $MIRROR minbase $IMG_PATH"
  declare -f build_base_tar build_base_image
}

build_base_tar() {
  local root=$WORK/debootstrap
  log "debootstrap --variant=minbase $SUITE from $MIRROR (log: $WORK/debootstrap.log)"
  if ! debootstrap --variant=minbase "$SUITE" "$root" "$MIRROR" >"$WORK/debootstrap.log" 2>&1; then
    tail -n 20 "$WORK/debootstrap.log" >&2
    die "debootstrap failed (it needs the Debian mirror $MIRROR)"
  fi
  unmount_under "$root"
  # What a container runtime provides, and host leftovers.
  find "$root/dev" -mindepth 1 -delete
  rm -f "$root/etc/resolv.conf" "$root/etc/hostname" "$root/var/log/bootstrap.log"
  printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
  mkdir -p "$OUT/cache"
  tar --numeric-owner --xattrs --xattrs-include='*' -C "$root" -cpf "$BASE_TAR.tmp" .
  mv "$BASE_TAR.tmp" "$BASE_TAR"
  base_recipe | sha >"$BASE_TAR.key"
  remove_dir "$root"
}

build_base_image() {
  local b=$WORK/bundle-base
  [ -z "$(manifest_of base)" ] || umoci rm --image "$LAYOUT:base"
  umoci new --image "$LAYOUT:base"
  umoci unpack --image "$LAYOUT:base" "$b"
  tar --numeric-owner --xattrs --xattrs-include='*' -C "$b/rootfs" -xpf "$BASE_TAR"
  BYTES=$(rootfs_bytes "$b/rootfs")
  umoci repack --history.created_by "debootstrap --variant=minbase $SUITE $MIRROR" \
    --image "$LAYOUT:base" "$b"
  umoci config --no-history --image "$LAYOUT:base" \
    --config.env "PATH=$IMG_PATH" --config.cmd bash --config.workingdir /
  remove_dir "$b"
}

# --- the images ---------------------------------------------------------------

app_recipe() {
  echo "app v1 $1 pkgs=${PKGS[$1]} cmd=${CMD[$1]} file=${WORKLOAD_FILE[$1]}"
  "workload_$1"
  declare -f chroot_install build_app complete_top_layer
  cat hack/lib/layer-parents.py
}

# The layer digests of tag $1's image, lowest first.
layers_of() { jq -r '.layers[].digest' "$(blob "$(manifest_of "$1")")"; }

# Writes to $2 the top layer of tag $1 (an umoci diff) with an entry for each
# parent directory of its entries that it lacks, taken from the layers below
# (hack/lib/layer-parents.py): `ctr-remote image optimize` (stargz) leaves
# out of its startup profile every file whose parents are not in its layer.
complete_top_layer() {
  local lower=() d l
  mapfile -t d < <(layers_of "$1")
  for l in "${d[@]:0:${#d[@]}-1}"; do lower+=(--lower "$(blob "$l")"); done
  python3 hack/lib/layer-parents.py --tmpdir "$WORK" add "${lower[@]}" "$(blob "${d[-1]}")" "$2"
}

# apt-get install "$@" into the rootfs $1, in a chroot.
chroot_install() {
  local root=$1 logf=$WORK/apt-$2.log
  shift
  cp -L /etc/resolv.conf "$root/etc/resolv.conf"
  printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
  chmod 0755 "$root/usr/sbin/policy-rc.d"
  mount_chroot "$root"
  log "apt-get install $* (log: $logf)"
  if ! chroot "$root" /usr/bin/env -i PATH="$IMG_PATH" HOME=/root LC_ALL=C \
      DEBIAN_FRONTEND=noninteractive /bin/sh -ec \
      'apt-get update -q; apt-get install -y -q --no-install-recommends "$@"; apt-get clean' \
      sh "$@" >"$logf" 2>&1; then
    tail -n 20 "$logf" >&2
    unmount_under "$root"
    die "apt-get install $* failed (it needs the Debian mirror $MIRROR)"
  fi
  unmount_under "$root"
  rm -f "$root/etc/resolv.conf" "$root/usr/sbin/policy-rc.d"
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
}

build_app() {
  local tag=$1 b=$WORK/bundle-$1 args=() a
  # shellcheck disable=SC2206 # word splitting of the package list is wanted
  local pkgs=(${PKGS[$tag]})
  umoci unpack --image "$LAYOUT:base" "$b"
  chroot_install "$b/rootfs" "${pkgs[@]}"
  mkdir -p "$b/rootfs/app"
  "workload_$tag" >"$b/rootfs${WORKLOAD_FILE[$tag]}"
  chmod 0755 "$b/rootfs${WORKLOAD_FILE[$tag]}"
  BYTES=$(rootfs_bytes "$b/rootfs")
  [ -n "$(manifest_of "$tag")" ] && umoci rm --image "$LAYOUT:$tag"
  # umoci's diff, made complete below and added to the base as the layer.
  umoci repack --image "$LAYOUT:$tag" "$b"
  complete_top_layer "$tag" "$WORK/layer-$tag.tar"
  umoci rm --image "$LAYOUT:$tag"
  umoci raw add-layer --image "$LAYOUT:base" --tag "$tag" \
    --history.created_by "apt-get install --no-install-recommends ${PKGS[$tag]}; ${WORKLOAD_FILE[$tag]}" \
    "$WORK/layer-$tag.tar"
  rm -f "$WORK/layer-$tag.tar"
  for a in ${CMD[$tag]}; do args+=(--config.cmd "$a"); done
  umoci config --no-history --image "$LAYOUT:$tag" --clear config.cmd "${args[@]}" \
    --config.workingdir /app
  remove_dir "$b"
}

# Runs tag $1's command (from the unpacked runtime config: args, env, cwd) in
# a chroot of its rootfs; its first line of output must be `ready`.
check_image() {
  local tag=$1 c=$WORK/check-$1 out rc=0 t0 t1 args=() env=() cwd layers=() l
  umoci unpack --image "$LAYOUT:$tag" "$c"
  mapfile -t args < <(jq -r '.process.args[]' "$c/config.json")
  mapfile -t env < <(jq -r '.process.env[]' "$c/config.json")
  cwd=$(jq -r '.process.cwd' "$c/config.json")
  [ "${args[*]}" = "${CMD[$tag]}" ] || die "$tag: image command is '${args[*]}', want '${CMD[$tag]}'"
  mount_chroot "$c/rootfs"
  t0=$(date +%s.%N)
  # shellcheck disable=SC2016 # $0 and $@ are for the inner sh
  out=$(timeout -k 5 120 chroot "$c/rootfs" /usr/bin/env -i "${env[@]}" \
    /bin/sh -c 'cd "$0" && exec "$@"' "$cwd" "${args[@]}" 2>&1 </dev/null) || rc=$?
  t1=$(date +%s.%N)
  unmount_under "$c/rootfs"
  if [ $rc != 0 ] || [ "${out%%$'\n'*}" != ready ]; then
    printf '%s\n' "$out" | head -n 20 >&2
    umoci rm --image "$LAYOUT:$tag" # not left for a benchmark to use
    die "$tag: check failed: '${args[*]}' exited $rc, first line '${out%%$'\n'*}' (want 'ready')"
  fi
  for l in $(layers_of "$tag"); do layers+=("$(blob "$l")"); done
  python3 hack/lib/layer-parents.py --tmpdir "$WORK" check "${layers[@]}" ||
    { umoci rm --image "$LAYOUT:$tag"; die "$tag: a layer lacks parent directories"; }
  log "$tag: check ok, '${args[*]}' printed ready in $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2fs", b - a }')"
  remove_dir "$c"
}

# --- main ---------------------------------------------------------------------

hack/install-deps.sh
for t in debootstrap umoci jq tar chroot flock; do
  command -v "$t" >/dev/null || die "$t not found (hack/install-deps.sh should have installed it)"
done

mkdir -p "$OUT/cache" "$OUT/stamps"
exec 9>"$OUT/.lock"
flock -n 9 || die "another build-images.sh is running on $OUT"

if [ ! -f "$LAYOUT/index.json" ]; then
  rm -rf "$LAYOUT" "$OUT"/stamps/*.stamp
  umoci init --layout "$LAYOUT"
fi

changed=0
BYTES=0
base_key=$(base_recipe | sha)
if ! stamp_ok base "$base_key"; then
  WORK=$(mktemp -d "$OUT/work.XXXXXX")
  if [ ! -f "$BASE_TAR" ] || [ "$(cat "$BASE_TAR.key" 2>/dev/null)" != "$base_key" ]; then
    build_base_tar
  else
    log "base: using the cached $BASE_TAR"
  fi
  log "base: layer from the base rootfs"
  build_base_image
  write_stamp base "$base_key" "$BYTES"
  changed=1
fi
base_manifest=$(manifest_of base)

for tag in "${TAGS[@]}"; do
  key=$(app_recipe "$tag" | sha)-${base_manifest#sha256:}
  stamp_ok "$tag" "$key" && continue
  [ -n "$WORK" ] || WORK=$(mktemp -d "$OUT/work.XXXXXX")
  log "$tag: building"
  rm -f "$(stamp_file "$tag")"
  build_app "$tag"
  check_image "$tag"
  write_stamp "$tag" "$key" "$BYTES"
  changed=1
done

if [ $changed = 1 ]; then
  umoci gc --layout "$LAYOUT"
else
  log "everything up to date"
fi

echo "layout: $LAYOUT"
printf '%-7s %-6s %-12s %-14s %s\n' tag layers compressed uncompressed cmd
for tag in base "${TAGS[@]}"; do
  m=$(manifest_of "$tag")
  [ -n "$m" ] || die "$tag: missing from $LAYOUT"
  man=$(blob "$m")
  cfg=$(blob "$(jq -r .config.digest "$man")")
  printf '%-7s %-6s %-12s %-14s %s\n' "$tag" "$(jq '.layers | length' "$man")" \
    "$(mib "$(jq '[.layers[].size] | add' "$man")")" \
    "$(mib "$(sed -n 's/^rootfs_bytes=//p' "$(stamp_file "$tag")")")" \
    "$(jq -r '(.config.Entrypoint // []) + (.config.Cmd // []) | join(" ")' "$cfg")"
done
