#!/usr/bin/env bash
# HelloBench-style cold start: for each image of hack/build-images.sh, the
# time from the pull to the workload's first output ("ready", printed once
# its imports or its compile are done), with the registry behind a link
# shaped with tc tbf, for:
#
#   full    ordinary full pull onto containerd's overlayfs snapshotter,
#           io.containerd.runc.v2 (the baseline)
#   lazy    `lazybd pull` + `ctr run --snapshotter lazybd --runtime
#           io.containerd.lazybd.v2`, nothing cached
#   trace   the same, with the startup trace an earlier run recorded in the
#           node's trace store (it is replayed at the container's Prepare)
#   p2p     the same, with P2P on: a warm peer (that has read the whole
#           image) and the super node are one unshaped hop away; fan-out 1
#           so the peer is the cold node's parent
#   warm    the image already pulled onto overlayfs: `ctr run` only
#
# Before every run the page cache is dropped; every cold run starts a fresh
# containerd and snapshotter (empty roots). The registry link bytes are the
# bytes the host received from the registry's netns until the first output.
# Prints a markdown table and, with DOCS=1, writes it and a PNG chart
# (gnuplot) into docs/benchmarks.md (between the coldstart markers) and
# docs/coldstart.png. A report, not a test. Needs root.
#
# Knobs: RATES (default "100mbit 1gbit"), RUNS (default 3), IMAGES (default
# "python node large"), MODES (default "full warm lazy trace p2p"),
# CHUNK (lazybd chunk size in bytes, default the converter's 1 MiB),
# IMAGES_DIR (default /var/tmp/lazybd-images), DOCS=1.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "bench-coldstart: must run as root" >&2; exit 1; }

RATES=${RATES:-100mbit 1gbit}
RUNS=${RUNS:-3}
IMAGES=${IMAGES:-python node large}
MODES=${MODES:-full warm lazy trace p2p}
IMAGES_DIR=${IMAGES_DIR:-/var/tmp/lazybd-images}
CHUNK=${CHUNK:-1048576}

hack/install-deps.sh
cargo build --release --locked -p lazybd-blockdev -p lazybd-snapshotter -p lazybd-shim --bins
hack/build-images.sh "$IMAGES_DIR"

STACK=$(mktemp -d /var/tmp/lazybd-coldstart.XXXXXX)
BIN=$PWD/target/release
NETNS=lbcs-reg
HOST_IF=lbcs-h
REGISTRY=10.203.0.2:5000
SNAPSHOTTER_METRICS=127.0.0.1:9882
SUPERNODE=127.0.0.1:7444
NS=bench
RESULTS=$STACK/results.tsv
# shellcheck source=hack/lib/stack.sh
. hack/lib/stack.sh

cleanup() {
  set +e
  [ -d "$STACK/peer-mnt" ] && "$BIN/lazybd" umount --root "$STACK/peer" "$STACK/peer-mnt" >/dev/null 2>&1
  containerd_and_snapshotter_down "$NS"
  daemon_down supernode
  daemon_down registry
  ip netns del "$NETNS" 2>/dev/null
  ip link del "$HOST_IF" 2>/dev/null
  unmount_under "$STACK"
  if [ -z "${KEEP:-}" ]; then rm -rf "$STACK"; else echo "kept $STACK"; fi
}
trap cleanup EXIT

echo "== the registry in netns $NETNS at $REGISTRY, behind $HOST_IF"
ip netns add "$NETNS"
ip link add "$HOST_IF" type veth peer name lbcs-r netns "$NETNS"
ip addr add 10.203.0.1/24 dev "$HOST_IF"
ip link set "$HOST_IF" up
ip -n "$NETNS" addr add 10.203.0.2/24 dev lbcs-r
ip -n "$NETNS" link set lbcs-r up
ip -n "$NETNS" link set lo up
registry_up "$STACK/registry-storage" "$REGISTRY" "$NETNS"

echo "== pushing and converting the images (unshaped; chunk size $CHUNK)"
for image in $IMAGES; do
  skopeo copy --quiet --dest-tls-verify=false "oci:$IMAGES_DIR/layout:$image" "docker://$REGISTRY/bench/$image:oci"
  "$BIN/lazybd" convert --plain-http --work-dir "$STACK" --chunk-size "$CHUNK" \
    "$REGISTRY/bench/$image:oci" "$REGISTRY/bench/$image:lazybd" >"$STACK/convert-$image.log"
done

shape() { # the registry's egress: what it sends to the node
  ip netns exec "$NETNS" tc qdisc replace dev lbcs-r root tbf rate "$1" burst 1mb latency 100ms
}

link_bytes() { cat "/sys/class/net/$HOST_IF/statistics/rx_bytes"; }

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

TRACE_CONFIG='[trace]
record_secs = 3'
P2P_CONFIG="[p2p]
supernode = \"http://$SUPERNODE\"
listen = \"127.0.0.1:7070\"
heartbeat_ms = 1000"

# A node with nothing cached; $1 is extra snapshotter config, $2 a trace
# store to start with.
fresh_node() {
  containerd_and_snapshotter_down "$NS"
  rm -rf "$STACK/containerd" "$STACK/snapshotter"
  if [ -n "${2:-}" ]; then
    mkdir -p "$STACK/snapshotter/root"
    cp -a "$2" "$STACK/snapshotter/root/traces"
  fi
  snapshotter_up "$TRACE_CONFIG
$1"
  containerd_up
}

full_start() {
  ctr_ -n "$NS" images pull --plain-http "$REGISTRY/bench/$1:oci" >"$STACK/pull.log"
  ctr_ -n "$NS" run --rm "$REGISTRY/bench/$1:oci" "cs-$1"
}

warm_start() {
  ctr_ -n "$NS" run --rm "$REGISTRY/bench/$1:oci" "cs-$1"
}

lazy_start() {
  "$BIN/lazybd" pull --address "$STACK/containerd/containerd.sock" -n "$NS" --plain-http \
    "$REGISTRY/bench/$1:lazybd" >"$STACK/pull.log"
  ctr_ -n "$NS" run --rm --snapshotter lazybd --runtime io.containerd.lazybd.v2 \
    "$REGISTRY/bench/$1:lazybd" "cs-$1"
}

# The starts run under timeout(1), in a child bash.
export -f full_start warm_start lazy_start ctr_
export STACK NS REGISTRY BIN

# One measured start: `measure RATE IMAGE MODE RUN START_FUNCTION`.
measure() {
  local rate=$1 image=$2 mode=$3 run=$4 start=$5 base ms bytes line
  drop_caches
  base=$(link_bytes)
  BYTES_NOW=link_bytes time_to_first_line timeout 600 bash -c '"$@"' - "$start" "$image" >"$STACK/measured"
  read -r ms bytes line <"$STACK/measured"
  [ "$line" = ready ] || { echo "bench-coldstart: $image/$mode: first output '$line', not 'ready'" >&2; exit 1; }
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$rate" "$image" "$mode" "$run" "$ms" "$((bytes - base))" >>"$RESULTS"
  printf '  %-6s %-6s run %s: %6s ms, %11s registry bytes\n' "$image" "$mode" "$run" "$ms" "$((bytes - base))"
}

# The warm peer for P2P runs: a `lazybd mount` in the same datacenter that has
# read the whole image, under a super node with fan-out 1.
warm_peer_up() {
  local image=$1
  supernode_up "$SUPERNODE" --fanout 1 --member-ttl-ms 3000
  cat >"$STACK/peer.toml" <<EOF
[p2p]
supernode = "http://$SUPERNODE"
listen = "127.0.0.1:7071"
heartbeat_ms = 1000
EOF
  mkdir -p "$STACK/peer-mnt"
  "$BIN/lazybd" mount --root "$STACK/peer" --plain-http --prefetch --p2p-config "$STACK/peer.toml" \
    "$REGISTRY/bench/$image:lazybd" "$STACK/peer-mnt"
  tar -cf /dev/null -C "$STACK/peer-mnt" .
  wait_until 600 "the warm peer to hold all of $image" peer_complete
}

peer_complete() {
  "$BIN/lazybd" stats --root "$STACK/peer" --json "$STACK/peer-mnt" |
    jq -e '[.layers[] | .chunks_present == .chunks_total] | all'
}

warm_peer_down() {
  "$BIN/lazybd" umount --root "$STACK/peer" "$STACK/peer-mnt"
  rm -rf "$STACK/peer" "$STACK/peer-mnt"
  daemon_down supernode
  rm -rf "$STACK/supernode"
}

has_mode() { [[ " $MODES " == *" $1 "* ]]; }

: >"$RESULTS"
for rate in $RATES; do
  shape "$rate"
  echo "== registry link $rate"
  for image in $IMAGES; do
    if has_mode full || has_mode warm; then
      for run in $(seq "$RUNS"); do
        fresh_node ""
        has_mode full && measure "$rate" "$image" full "$run" full_start
      done
      has_mode full || ctr_ -n "$NS" images pull --plain-http "$REGISTRY/bench/$image:oci" >/dev/null
      if has_mode warm; then
        for run in $(seq "$RUNS"); do measure "$rate" "$image" warm "$run" warm_start; done
      fi
    fi
    rm -rf "$STACK/traces-$image"
    if has_mode lazy || has_mode trace; then
      for run in $(seq "$RUNS"); do
        fresh_node ""
        measure "$rate" "$image" lazy "$run" lazy_start
        if [ ! -d "$STACK/traces-$image" ]; then
          wait_until 30 "the startup trace of $image" \
            sh -c "ls '$STACK/snapshotter/root/traces/' | grep -q ."
          cp -a "$STACK/snapshotter/root/traces" "$STACK/traces-$image"
        fi
        has_mode lazy || break
      done
    fi
    if has_mode trace; then
      for run in $(seq "$RUNS"); do
        fresh_node "" "$STACK/traces-$image"
        measure "$rate" "$image" trace "$run" lazy_start
      done
    fi
    if has_mode p2p; then
      containerd_and_snapshotter_down "$NS"
      warm_peer_up "$image"
      for run in $(seq "$RUNS"); do
        fresh_node "$P2P_CONFIG"
        measure "$rate" "$image" p2p "$run" lazy_start
        # The last cold node must leave the peer tree before the next one joins.
        containerd_and_snapshotter_down "$NS"
        sleep 4
      done
      warm_peer_down
    fi
  done
done
containerd_and_snapshotter_down "$NS"

cp "$RESULTS" /var/tmp/lazybd-coldstart-results.tsv
python3 hack/coldstart-report.py ${DOCS:+--docs} "$RESULTS"
