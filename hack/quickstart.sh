#!/usr/bin/env bash
# The quickstart, on Debian bookworm as root:
#
#   hack/quickstart.sh        # install, build, start the stack, run a container lazily
#   hack/quickstart.sh down   # stop and remove everything it started
#
# It installs what it needs, builds lazybd (release), builds a Python image
# from Debian packages (hack/build-images.sh; needs the Debian mirror once),
# and starts a private stack under /var/lib/lazybd-quickstart: a
# docker-registry on 127.0.0.1, the lazybd super node, lazybd-snapshotter and
# a containerd with its own root, state and socket that has the snapshotter
# as proxy plugin `lazybd` and containerd-shim-lazybd-v2 as runtime
# io.containerd.lazybd.v2. It pushes the image, converts it to lazybd
# layers, and then starts a container from it twice: lazily (`lazybd pull`,
# `ctr run --snapshotter lazybd --runtime io.containerd.lazybd.v2`) and by
# an ordinary full pull onto containerd's overlayfs snapshotter with
# io.containerd.runc.v2. For each it prints the time from the pull to the
# container's first output and the bytes fetched against the image's size.
#
# A second run reuses the running stack, the images and the conversion; its
# lazy start finds the chunks the first one fetched in the node's chunk cache
# (kept after the image is removed, up to the cache's capacity).
#
# Knobs: QUICKSTART_DIR (default /var/lib/lazybd-quickstart), QUICKSTART_PORT
# (registry port, default 5055), IMAGES_DIR (hack/build-images.sh's output).
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" = 0 ] || { echo "quickstart: run as root (it mounts filesystems and runs containers)" >&2; exit 1; }

STACK=${QUICKSTART_DIR:-/var/lib/lazybd-quickstart}
BIN=$PWD/target/release
REGISTRY=127.0.0.1:${QUICKSTART_PORT:-5055}
SNAPSHOTTER_METRICS=127.0.0.1:9881
SUPERNODE=127.0.0.1:7443
NS=quickstart
# shellcheck source=hack/lib/stack.sh
. hack/lib/stack.sh

down() {
  containerd_and_snapshotter_down "$NS"
  daemon_down supernode
  daemon_down registry
  unmount_under "$STACK"
  rm -rf "$STACK"
  echo "quickstart: stopped and removed everything under $STACK"
}

if [ "${1:-}" = down ]; then
  down
  exit 0
elif [ -n "${1:-}" ]; then
  echo "usage: hack/quickstart.sh [down]" >&2
  exit 2
fi

hack/install-deps.sh
echo "== building lazybd (release)"
cargo build --release --locked -p lazybd-blockdev -p lazybd-snapshotter -p lazybd-shim --bins
hack/build-images.sh "${IMAGES_DIR:-/var/tmp/lazybd-images}"
LAYOUT=${IMAGES_DIR:-/var/tmp/lazybd-images}/layout

echo "== the stack under $STACK"
mkdir -p "$STACK"
daemon_running registry || registry_up "$STACK/registry/storage" "$REGISTRY"
daemon_running supernode || supernode_up "$SUPERNODE"
daemon_running snapshotter || snapshotter_up "[p2p]
supernode = \"http://$SUPERNODE\"
listen = \"127.0.0.1:7070\""
daemon_running containerd || containerd_up
echo "registry $REGISTRY, super node $SUPERNODE, snapshotter metrics http://$SNAPSHOTTER_METRICS/metrics"
echo "containerd: ctr --address $STACK/containerd/containerd.sock -n $NS ..."

OCI=$REGISTRY/quickstart/python:oci
LAZY=$REGISTRY/quickstart/python:lazybd
if ! skopeo inspect --tls-verify=false "docker://$LAZY" >/dev/null 2>&1; then
  echo "== pushing the image and converting it to lazybd layers"
  skopeo copy --quiet --dest-tls-verify=false "oci:$LAYOUT:python" "docker://$OCI"
  "$BIN/lazybd" convert --plain-http --work-dir "$STACK" "$OCI" "$LAZY"
fi
CMD=$(skopeo inspect --tls-verify=false --config "docker://$OCI" | jq -r '.config.Cmd | join(" ")')

lazy_start() {
  "$BIN/lazybd" pull --address "$STACK/containerd/containerd.sock" -n "$NS" --plain-http "$LAZY" >"$STACK/pull.log"
  ctr_ -n "$NS" run --rm --snapshotter lazybd --runtime io.containerd.lazybd.v2 "$LAZY" quickstart-lazy
}

full_start() {
  ctr_ -n "$NS" images pull --plain-http "$OCI" >"$STACK/pull.log"
  ctr_ -n "$NS" run --rm "$OCI" quickstart-full
}

# Each start begins without the image in containerd and with cold page caches.
forget_images() {
  for ref in $(ctr_ -n "$NS" images ls -q); do ctr_ -n "$NS" images rm --sync "$ref" >/dev/null; done
  sync
  echo 3 >/proc/sys/vm/drop_caches
}

image_bytes() { # compressed size of the layers of $1
  skopeo inspect --tls-verify=false --raw "docker://$1" | jq '[.layers[].size] | add'
}

echo "== starting \`$CMD\` lazily (lazybd snapshotter, lazybd shim)"
forget_images
before=$(snapshotter_fetched_bytes)
BYTES_NOW=snapshotter_fetched_bytes time_to_first_line lazy_start >"$STACK/measured"
read -r lazy_ms lazy_bytes lazy_line <"$STACK/measured"
lazy_bytes=$((lazy_bytes - before))
echo "first output \"$lazy_line\" after $lazy_ms ms"

echo "== starting it after a full pull (overlayfs snapshotter, runc-v2 shim)"
forget_images
time_to_first_line full_start >"$STACK/measured"
read -r full_ms _ full_line <"$STACK/measured"
echo "first output \"$full_line\" after $full_ms ms"

lazy_size=$(image_bytes "$LAZY")
full_size=$(image_bytes "$OCI")
echo
printf '%-28s %18s %16s %16s\n' "" "to first output" "bytes fetched" "image size"
printf '%-28s %15s ms %16s %16s\n' "lazybd (lazy pull)" "$lazy_ms" "$lazy_bytes" "$lazy_size"
printf '%-28s %15s ms %16s %16s\n' "overlayfs (full pull)" "$full_ms" "$full_size" "$full_size"
echo
echo "lazybd fetched $((100 * lazy_bytes / lazy_size))% of its image, by source:"
curl -fsS "http://$SNAPSHOTTER_METRICS/metrics" | grep '^lazybd_source_bytes_total' || true
echo "run again to reuse the stack; hack/quickstart.sh down removes it"
