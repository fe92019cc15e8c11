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
#   profile the same image converted again with that trace as its startup
#           profile (`lazybd convert --profile`): the chunks it read first
#           are stored first in each blob and streamed at attach
#   optimize the image converted with `lazybd convert --record-profile`:
#           its entrypoint run once under runc at conversion, what it read
#           stored first (the analogue of `ctr-remote image optimize`)
#   p2p     the same, with P2P on: a warm peer (that has read the whole
#           image) and the super node are one unshaped hop away; fan-out 1
#           so the peer is the cold node's parent; with the lazy mode, a
#           lazy start from the registry is measured right after each run
#   warm    the image already pulled onto overlayfs: `ctr run` only, on a
#           second containerd (the warm node) that keeps the image for the
#           image's whole turn; a warm start is also measured right after
#           every trace, profile and optimize run, for their ratio to it
#   stargz  stargz-snapshotter (the peer; its daemon built from Debian's
#           sources by ../shared/anchors/stargz/build.sh) with the image made
#           by `ctr-remote image optimize --oci`: its startup profile (the
#           entrypoint run once, the files it read first in each layer,
#           prefetched up to the landmark); `ctr-remote image rpull` +
#           `ctr run --snapshotter stargz`
#   stargz-plain  the same with `ctr-remote image convert --estargz --oci`
#           (no profile, no prefetch)
#
# Before every run the page cache is dropped; every cold run starts a fresh
# containerd and snapshotters (empty roots). The registry, the super node and
# the warm peer stand for other machines: they run under SCHED_IDLE, so on
# this machine they take only the CPU the node leaves idle, instead of
# competing with the start they serve (`as_another_machine`). The registry
# link bytes are the bytes the host received from the registry's netns until
# the first output.
# A stargz run fails unless every layer of the image was mounted remotely
# (one FUSE mount per layer under stargz's root, no "remote-snapshot-prepared
# false" in its log), i.e. nothing fell back to a full pull.
#
# Once per image, hack/read-volume.sh measures the workload's own read volume
# (its rootfs as one EROFS image on a plain loop device, readahead 0).
# For every lazybd run it also records where the time went (the pull and in
# it the layers' attach: index, then FUSE file, loop and EROFS; the container
# until "ready"; the time reads waited for fetches; misses; registry
# requests), from the pull's wall time and the snapshotter's metrics.
# Prints markdown tables (times and bytes; ratios, the read volume and the
# physical limit; the breakdown) and, with DOCS=1, writes them and a PNG chart (gnuplot)
# into docs/benchmarks.md (between the coldstart markers) and
# docs/coldstart.png. The results stay in /var/tmp/lazybd-coldstart-*.tsv.
# A report, not a test. Needs root.
#
# Knobs: RATES (default "100mbit 1gbit"), RUNS (default 3), IMAGES (default
# "python node large"), MODES (default "full warm lazy trace profile optimize
# p2p stargz stargz-plain"), CHUNK (largest lazybd chunk in bytes, default the
# converter's 64 KiB), IMAGES_DIR (default /var/tmp/lazybd-images),
# SNAPSHOTTER_CONFIG (top-level lines added to lazybd-snapshotter's config,
# e.g. "lazy_read_ahead_kb = 16"), RECORD_READ_AHEAD_KB (`lazybd convert
# --record-read-ahead-kb` of the optimize mode, default the converter's),
# KEEP=1 (keep the stack's directory and
# logs), DOCS=1; for the stargz
# modes STARGZ_BIN (a containerd-stargz-grpc to use), else STARGZ_ANCHOR (the
# directory with build.sh, default ../shared/anchors/stargz beside the main
# checkout) builds one into STARGZ_BUILD_DIR (default /var/tmp/lazybd-stargz,
# rebuilt when the anchor changes); `ctr-remote` comes from Debian's
# stargz-snapshotter package (build.sh installs it). Asking for a stargz mode
# without a daemon is an error, never a silent skip.
set -euo pipefail
cd "$(dirname "$0")/.."
die() { echo "bench-coldstart: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root"

RATES=${RATES:-100mbit 1gbit}
RUNS=${RUNS:-3}
IMAGES=${IMAGES:-python node large}
MODES=${MODES:-full warm lazy trace profile optimize p2p stargz stargz-plain}
IMAGES_DIR=${IMAGES_DIR:-/var/tmp/lazybd-images}
CHUNK=${CHUNK:-65536}
main_checkout=$(dirname "$(git rev-parse --path-format=absolute --git-common-dir 2>/dev/null || echo "$PWD/.git")")
STARGZ_ANCHOR=${STARGZ_ANCHOR:-$main_checkout/../shared/anchors/stargz}
STARGZ_BUILD_DIR=${STARGZ_BUILD_DIR:-/var/tmp/lazybd-stargz}

for m in $MODES; do
  case $m in full | warm | lazy | trace | profile | optimize | p2p | stargz | stargz-plain) ;; *) die "unknown mode $m" ;; esac
done
has_mode() { [[ " $MODES " == *" $1 "* ]]; }
has_stargz() { has_mode stargz || has_mode stargz-plain; }

# Wall time per step, printed at the end: `phase NAME` ends the running step
# and starts NAME.
T0=$SECONDS
PHASE=
PHASE_T=$SECONDS
PHASES=()
phase() {
  [ -z "$PHASE" ] || PHASES+=("$(printf '%6d s  %s' $((SECONDS - PHASE_T)) "$PHASE")")
  PHASE=$1
  PHASE_T=$SECONDS
  [ -z "$PHASE" ] || echo "== [$((SECONDS - T0)) s] $PHASE"
}

# The stargz daemon: STARGZ_BIN, or built from the anchor into
# STARGZ_BUILD_DIR (kept there, keyed by the anchor's files).
stargz_daemon() {
  if [ -n "${STARGZ_BIN:-}" ]; then
    [ -x "$STARGZ_BIN" ] || die "STARGZ_BIN=$STARGZ_BIN is not an executable"
  else
    [ -f "$STARGZ_ANCHOR/build.sh" ] ||
      die "stargz modes need STARGZ_BIN or STARGZ_ANCHOR (no $STARGZ_ANCHOR/build.sh)"
    local key
    key=$(cd "$STARGZ_ANCHOR" && find . -path ./bin -prune -o -type f -print0 | sort -z |
      xargs -0 sha256sum | sha256sum | cut -c1-64)
    STARGZ_BIN=$STARGZ_BUILD_DIR/containerd-stargz-grpc
    if [ ! -x "$STARGZ_BIN" ] || [ "$(cat "$STARGZ_BUILD_DIR/anchor.key" 2>/dev/null)" != "$key" ]; then
      echo "building containerd-stargz-grpc from $STARGZ_ANCHOR into $STARGZ_BUILD_DIR"
      rm -f "$STARGZ_BUILD_DIR/anchor.key"
      sh "$STARGZ_ANCHOR/build.sh" "$STARGZ_BUILD_DIR" || die "building the stargz daemon failed"
      echo "$key" >"$STARGZ_BUILD_DIR/anchor.key"
    fi
  fi
  "$STARGZ_BIN" -version >/dev/null || die "$STARGZ_BIN does not run"
  command -v ctr-remote >/dev/null || die "ctr-remote not found (Debian package stargz-snapshotter)"
}

phase "install, build, images"
hack/install-deps.sh
cargo build --release --locked -p lazybd-blockdev -p lazybd-snapshotter -p lazybd-shim --bins
hack/build-images.sh "$IMAGES_DIR"
if has_stargz; then
  phase "the stargz daemon"
  stargz_daemon
fi

STACK=$(mktemp -d /var/tmp/lazybd-coldstart.XXXXXX)
BIN=$PWD/target/release
NETNS=lbcs-reg
HOST_IF=lbcs-h
REGISTRY=10.203.0.2:5000
SNAPSHOTTER_METRICS=127.0.0.1:9882
STARGZ_METRICS=127.0.0.1:9883
SUPERNODE=127.0.0.1:7444
NS=bench
RESULTS=$STACK/results.tsv
READVOL=$STACK/read-volume.tsv
BREAKDOWN=$STACK/breakdown.tsv
# shellcheck source=hack/lib/stack.sh
. hack/lib/stack.sh

# Runs "$@" (a function that starts daemons) with every process it starts
# under SCHED_IDLE: a daemon standing for another machine. On a node with
# two cores, the registry's CPU alone (some 30-50 ms of it while a profile
# streams at 1 Gbit/s) otherwise delays the containerd, runc and workload it
# is serving, which a registry elsewhere would not (docs/benchmarks.md).
as_another_machine() {
  (
    chrt --idle -p 0 "$BASHPID"
    "$@"
  )
}

cleanup() {
  set +e
  [ -d "$STACK/peer-mnt" ] && "$BIN/lazybd" umount --root "$STACK/peer" "$STACK/peer-mnt" >/dev/null 2>&1
  containerd_and_snapshotter_down "$NS"
  warm_node_down
  daemon_down supernode
  daemon_down registry
  ip netns del "$NETNS" 2>/dev/null
  ip link del "$HOST_IF" 2>/dev/null
  unmount_under "$STACK"
  if [ -z "${KEEP:-}" ]; then rm -rf "$STACK"; else echo "kept $STACK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

phase "the registry in netns $NETNS at $REGISTRY, behind $HOST_IF"
ip netns add "$NETNS"
ip link add "$HOST_IF" type veth peer name lbcs-r netns "$NETNS"
ip addr add 10.203.0.1/24 dev "$HOST_IF"
ip link set "$HOST_IF" up
ip -n "$NETNS" addr add 10.203.0.2/24 dev lbcs-r
ip -n "$NETNS" link set lbcs-r up
ip -n "$NETNS" link set lo up
as_another_machine registry_up "$STACK/registry-storage" "$REGISTRY" "$NETNS"

phase "pushing and converting the images for lazybd (unshaped; chunk size $CHUNK)"
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
# store to start with. With a stargz mode, stargz's daemon runs on every
# node (before containerd), idle unless a stargz mode uses it.
fresh_node() {
  containerd_and_snapshotter_down "$NS"
  rm -rf "$STACK/containerd" "$STACK/snapshotter" "$STACK/stargz"
  if [ -n "${2:-}" ]; then
    mkdir -p "$STACK/snapshotter/root"
    cp -a "$2" "$STACK/snapshotter/root/traces"
  fi
  local extra=
  if has_stargz; then
    stargz_up
    extra=$(stargz_proxy_config)
  fi
  snapshotter_up "$TRACE_CONFIG
$1"
  containerd_up "$extra"
}

ctr_remote() {
  ctr-remote --address "$STACK/containerd/containerd.sock" "$@"
}

# Runs "$@" with its output in log $1; on failure shows the log's tail.
logged() {
  local logf=$1
  shift
  "$@" >"$logf" 2>&1 || { tail -n 30 "$logf" >&2; die "failed: $* (log $logf)"; }
}

# Fails unless every layer of $REGISTRY/bench/$1:$2 (an optimized eStargz
# image) has a .prefetch.landmark with every file the profile $3 (optimize's
# --record-out) recorded in that layer before it: a file whose parent
# directories the layer lacked would have been left out of the profile.
check_stargz_profile() {
  local image=$1 tag=$2 record=$3 manifest i=0 d names recorded before missing
  manifest=$(curl -fsS -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
    "http://$REGISTRY/v2/bench/$image/manifests/$tag")
  [ -s "$record" ] || die "$image: optimize recorded no file reads ($record)"
  for d in $(jq -r '.layers[].digest' <<<"$manifest"); do
    names=$STACK/esgz-$image-$i.list
    curl -fsS "http://$REGISTRY/v2/bench/$image/blobs/$d" | tar -tzf - >"$names"
    before=$(awk '$0 == ".prefetch.landmark" { print NR - 1; found = 1; exit } END { if (!found) print -1 }' "$names")
    jq -r --argjson i "$i" 'select(.layerIndex == $i) | .path' "$record" |
      sed 's,^/,,; s,/$,,' | sort -u >"$STACK/esgz-$image-$i.recorded"
    recorded=$(wc -l <"$STACK/esgz-$image-$i.recorded")
    if [ "$recorded" -gt 0 ]; then
      [ "$before" -ge 0 ] || die "$image:$tag layer $i has no .prefetch.landmark"
      missing=$(head -n "$before" "$names" | sed 's,^\./,,; s,/$,,' | sort -u |
        comm -13 - "$STACK/esgz-$image-$i.recorded" | wc -l)
      [ "$missing" = 0 ] || die "$image:$tag layer $i: $missing of $recorded recorded files are not before the landmark"
    fi
    echo "  $image:$tag layer $i: $recorded files read at start, $before entries before the landmark"
    i=$((i + 1))
  done
}

# The eStargz images: both made in a containerd that has the OCI image
# (optimize runs its entrypoint there once, under fanotify).
stargz_images() {
  local image=$1
  fresh_node ""
  logged "$STACK/stargz-src-$image.log" ctr_ -n "$NS" images pull --plain-http "$REGISTRY/bench/$image:oci"
  if has_mode stargz; then
    logged "$STACK/optimize-$image.log" ctr_remote -n "$NS" images optimize --oci --period 120 \
      --record-out "$STACK/optimize-$image.record" \
      "$REGISTRY/bench/$image:oci" "$REGISTRY/bench/$image:esgz-opt"
    logged "$STACK/push-opt-$image.log" ctr_remote -n "$NS" images push --plain-http "$REGISTRY/bench/$image:esgz-opt"
    check_stargz_profile "$image" esgz-opt "$STACK/optimize-$image.record"
  fi
  if has_mode stargz-plain; then
    logged "$STACK/convert-esgz-$image.log" ctr_remote -n "$NS" images convert --estargz --oci \
      "$REGISTRY/bench/$image:oci" "$REGISTRY/bench/$image:esgz"
    logged "$STACK/push-plain-$image.log" ctr_remote -n "$NS" images push --plain-http "$REGISTRY/bench/$image:esgz"
  fi
  containerd_and_snapshotter_down "$NS"
}

# Fails unless stargz mounted every layer of $1's image remotely.
check_stargz_remote() {
  local image=$1 layers fuse
  layers=$(jq '.layers | length' "$IMAGES_DIR/layout/blobs/sha256/$(jq -r --arg t "$image" \
    '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == $t) | .digest' \
    "$IMAGES_DIR/layout/index.json" | cut -d: -f2)")
  fuse=$(findmnt -rn -o TARGET,FSTYPE | awk -v d="$STACK/stargz/root/" 'index($1, d) == 1 && $2 ~ /^fuse/' | wc -l)
  if grep -q '"remote-snapshot-prepared":"false"' "$STACK/stargz/log" || [ "$fuse" != "$layers" ]; then
    grep '"remote-snapshot-prepared"' "$STACK/stargz/log" | tail -n 5 >&2
    die "$image: stargz mounted $fuse of $layers layers remotely (FUSE); the rest fell back to a full pull"
  fi
}

full_start() {
  ctr_ -n "$NS" images pull --plain-http "$REGISTRY/bench/$1:oci" >"$STACK/pull.log"
  ctr_ -n "$NS" run --rm "$REGISTRY/bench/$1:oci" "cs-$1"
}

warm_start() {
  warm_ctr -n "$NS" run --rm "$REGISTRY/bench/$1:oci" "cs-$1"
}

warm_ctr() {
  ctr --address "$STACK/warm/containerd.sock" "$@"
}

stargz_start() {
  ctr-remote --address "$STACK/containerd/containerd.sock" -n "$NS" images rpull --plain-http \
    "$REGISTRY/bench/$1" >"$STACK/pull.log"
  ctr_ -n "$NS" run --rm --snapshotter stargz "$REGISTRY/bench/$1" "cs-${1%%:*}"
}

stargz_opt_start() { stargz_start "$1:esgz-opt"; }
stargz_plain_start() { stargz_start "$1:esgz"; }

lazy_start() {
  local t0 t1
  now_us t0
  "$BIN/lazybd" pull --address "$STACK/containerd/containerd.sock" -n "$NS" --plain-http \
    "$REGISTRY/bench/$1:${2:-lazybd}" >"$STACK/pull.log"
  now_us t1
  echo "$(((t1 - t0) / 1000))" >"$STACK/pull-ms"
  ctr_ -n "$NS" run --rm --snapshotter lazybd --runtime io.containerd.lazybd.v2 \
    "$REGISTRY/bench/$1:${2:-lazybd}" "cs-$1"
}

lazy_profiled_start() {
  lazy_start "$1" lazybd-profiled
}

lazy_optimized_start() {
  lazy_start "$1" lazybd-optimized
}

# The starts run under timeout(1), in a child bash.
export -f now_us full_start warm_start warm_ctr lazy_start lazy_profiled_start lazy_optimized_start stargz_start stargz_opt_start stargz_plain_start ctr_
export STACK NS REGISTRY BIN

# One measured start: `measure RATE IMAGE MODE RUN START_FUNCTION`.
measure() {
  local rate=$1 image=$2 mode=$3 run=$4 start=$5 base ms bytes line
  drop_caches
  base=$(link_bytes)
  BYTES_NOW=link_bytes time_to_first_line timeout 600 bash -c '"$@"' - "$start" "$image" >"$STACK/measured"
  read -r ms bytes line <"$STACK/measured"
  [ "$line" = ready ] || die "$image/$mode: first output '$line', not 'ready'"
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$rate" "$image" "$mode" "$run" "$ms" "$((bytes - base))" >>"$RESULTS"
  printf '  %-6s %-6s run %s: %6s ms, %11s registry bytes\n' "$image" "$mode" "$run" "$ms" "$((bytes - base))"
  case $mode in lazy | trace | profile | optimize | p2p) breakdown "$rate" "$image" "$mode" "$run" "$ms" ;; esac
}

# Where a lazybd cold start's time went, from the pull's wall time and the
# snapshotter's counters (docs/snapshotter.md#metrics): the pull (every
# Prepare, which waits for its layer's index; FUSE file, loop and EROFS
# finish behind it),
# then the container until "ready", and in it the time reads waited for
# fetches (the read latency sum; reads after "ready" count too).
breakdown() {
  local rate=$1 image=$2 mode=$3 run=$4 ms=$5 m pull
  pull=$(cat "$STACK/pull-ms")
  m=$(curl -sf "http://$SNAPSHOTTER_METRICS/metrics") || die "no snapshotter metrics"
  metric() { awk -v n="$1" '$1 == n { print $2 }' <<<"$m"; }
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$rate" "$image" "$mode" "$run" \
    "$pull" "$(metric lazybd_attach_index_milliseconds_total)" \
    "$(metric lazybd_attach_expose_milliseconds_total)" "$((ms - pull))" \
    "$(awk -v s="$(metric lazybd_read_latency_seconds_sum)" 'BEGIN { printf "%d", s * 1000 }')" \
    "$(metric lazybd_cache_misses_total)" "$(metric lazybd_source_requests_total'{source="registry"}')" \
    >>"$BREAKDOWN"
}

# The warm node: its own containerd (beside the cold node's, which every
# cold run replaces) with $1's image pulled onto overlayfs. The warm start
# reads a cold disk, and on this host it varies by up to 40% from one minute
# to another (0.28 s for python in one run of this script, 0.20 s in the
# next), so a cold mode's ratio to the warm start pairs each of its runs
# with a warm start measured right after it (`warm@MODE` in the results).
warm_node_up() {
  containerd_up "" "$STACK/warm"
  warm_ctr -n "$NS" images pull --plain-http "$REGISTRY/bench/$1:oci" >/dev/null
}

warm_node_down() {
  daemon_down warm
  unmount_under "$STACK/warm"
  rm -rf "$STACK/warm"
}

# A cold run of mode $3 (`measure` arguments), then, with the warm mode
# asked for, a warm start beside it.
measure_beside_warm() {
  measure "$@"
  has_mode warm || return 0
  measure "$1" "$2" "warm@$3" "$4" warm_start
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

if has_stargz; then
  for image in $IMAGES; do
    phase "eStargz images of $image (ctr-remote optimize / convert, unshaped)"
    stargz_images "$image"
  done
fi

: >"$READVOL"
for image in $IMAGES; do
  phase "the read volume of $image (hack/read-volume.sh)"
  hack/read-volume.sh "$image" "$IMAGES_DIR" >>"$READVOL"
done

: >"$RESULTS"
: >"$BREAKDOWN"
for rate in $RATES; do
  shape "$rate"
  echo "== registry link $rate"
  for image in $IMAGES; do
    if has_mode full || has_mode warm; then
      phase "$rate $image: full and warm"
      if has_mode full; then
        for run in $(seq "$RUNS"); do
          fresh_node ""
          measure "$rate" "$image" full "$run" full_start
        done
      fi
      if has_mode warm; then
        warm_node_up "$image"
        for run in $(seq "$RUNS"); do measure "$rate" "$image" warm "$run" warm_start; done
      fi
    fi
    rm -rf "$STACK/traces-$image"
    if has_mode lazy || has_mode trace || has_mode profile; then
      phase "$rate $image: lazy and trace"
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
        measure_beside_warm "$rate" "$image" trace "$run" lazy_start
      done
    fi
    if has_mode profile; then
      phase "$rate $image: profile"
      # Converted with this rate's trace: a node's trace holds what it read
      # with the readahead its link gave it (docs/blockdev.md).
      if [ ! -f "$STACK/convert-profiled-$image-$rate.log" ]; then
        profile_file=$(find "$STACK/traces-$image" -type f | head -n 1)
        [ -n "$profile_file" ] || die "$image: no startup trace to convert with"
        logged "$STACK/convert-profiled-$image-$rate.log" "$BIN/lazybd" convert --plain-http \
          --work-dir "$STACK" --chunk-size "$CHUNK" --profile "$profile_file" \
          "$REGISTRY/bench/$image:oci" "$REGISTRY/bench/$image:lazybd-profiled"
      fi
      for run in $(seq "$RUNS"); do
        fresh_node ""
        measure_beside_warm "$rate" "$image" profile "$run" lazy_profiled_start
      done
    fi
    if has_mode optimize; then
      phase "$rate $image: optimize"
      if [ ! -f "$STACK/convert-optimized-$image.log" ]; then
        logged "$STACK/convert-optimized-$image.log" "$BIN/lazybd" convert --plain-http \
          --work-dir "$STACK" --chunk-size "$CHUNK" --record-profile --record-secs 60 \
          ${RECORD_READ_AHEAD_KB:+--record-read-ahead-kb "$RECORD_READ_AHEAD_KB"} \
          "$REGISTRY/bench/$image:oci" "$REGISTRY/bench/$image:lazybd-optimized"
      fi
      for run in $(seq "$RUNS"); do
        fresh_node ""
        measure_beside_warm "$rate" "$image" optimize "$run" lazy_optimized_start
      done
    fi
    if has_mode p2p; then
      phase "$rate $image: p2p"
      containerd_and_snapshotter_down "$NS"
      as_another_machine warm_peer_up "$image"
      for run in $(seq "$RUNS"); do
        fresh_node "$P2P_CONFIG"
        measure "$rate" "$image" p2p "$run" lazy_start
        # The registry's start beside it (`lazy@p2p`), P2P off: the host's
        # drift otherwise decides whether a peer beats the registry.
        if has_mode lazy; then
          fresh_node ""
          measure "$rate" "$image" lazy@p2p "$run" lazy_start
        fi
        # The last cold node must leave the peer tree before the next one joins.
        containerd_and_snapshotter_down "$NS"
        sleep 4
      done
      warm_peer_down
    fi
    for mode in stargz stargz-plain; do
      has_mode "$mode" || continue
      phase "$rate $image: $mode"
      for run in $(seq "$RUNS"); do
        fresh_node ""
        if [ "$mode" = stargz ]; then
          measure "$rate" "$image" "$mode" "$run" stargz_opt_start
        else
          measure "$rate" "$image" "$mode" "$run" stargz_plain_start
        fi
        check_stargz_remote "$image"
      done
    done
    warm_node_down
  done
done
containerd_and_snapshotter_down "$NS"
phase ""
echo "== wall time per step"
printf '%s\n' "${PHASES[@]}"
echo "$(printf '%6d s' $((SECONDS - T0)))  in all"

cp "$RESULTS" /var/tmp/lazybd-coldstart-results.tsv
cp "$READVOL" /var/tmp/lazybd-coldstart-read-volume.tsv
cp "$BREAKDOWN" /var/tmp/lazybd-coldstart-breakdown.tsv
python3 hack/coldstart-report.py ${DOCS:+--docs} --read-volume "$READVOL" --breakdown "$BREAKDOWN" "$RESULTS"
