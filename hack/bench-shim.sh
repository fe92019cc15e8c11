#!/usr/bin/env bash
# containerd-shim-lazybd-v2 vs containerd-shim-runc-v2, side by side in one
# run against a private containerd 1.6: per-container start latency and shim
# resident memory. Needs root. A report, not a test.
#
# Start latency: `ctr run -d` of a busybox rootfs, from the call until it
# returns (containerd has created the task and the shim has answered Start,
# so the process runs), runtimes interleaved, median and spread of ROUNDS.
# Memory: KEEP containers left running per runtime, then the mean Rss and
# Pss of their shims (one shim per container, as `ctr run` makes them).
#
# Knobs (environment): ROUNDS (default 30), KEEP (default 10).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "bench-shim: must run as root" >&2; exit 1; }
ROUNDS=${ROUNDS:-30}
KEEP=${KEEP:-10}
LAZYBD=io.containerd.lazybd.v2
RUNC=io.containerd.runc.v2

cargo build --release -p lazybd-shim --bins
STACK=$(mktemp -d /var/tmp/lazybd-bench-shim.XXXXXX)
BIN=$PWD/target/release
ns=bench
# shellcheck source=hack/lib/stack.sh
. hack/lib/stack.sh
ctr_() { timeout -k 5 120 ctr -a "$STACK/containerd/containerd.sock" -n "$ns" "$@"; }
cleanup() {
  set +e
  for id in $(ctr_ task ls -q 2>/dev/null); do ctr_ task kill -s SIGKILL "$id" >/dev/null 2>&1; done
  sleep 1
  for id in $(ctr_ task ls -q 2>/dev/null); do ctr_ task rm -f "$id" >/dev/null 2>&1; done
  for id in $(ctr_ containers ls -q 2>/dev/null); do ctr_ containers rm "$id" >/dev/null 2>&1; done
  daemon_down containerd
  unmount_under "$STACK"
  rm -rf "$STACK"
}
trap cleanup EXIT

mkdir -p "$STACK/rootfs/bin"
cp /bin/busybox "$STACK/rootfs/bin/busybox"
for applet in sh true sleep; do ln -s busybox "$STACK/rootfs/bin/$applet"; done
# The stack's containerd: the lazybd shim on its PATH; no snapshotter runs,
# so the shim's start hook finds no control socket, as on a plain node.
containerd_up

now_us() { echo $(($(date +%s%N) / 1000)); }
# One start: ctr run -d, timed; the container is removed outside the timing.
start_once() { # runtime id -> prints microseconds
  local t0 t1
  t0=$(now_us)
  ctr_ run -d --runtime "$1" --rootfs "$STACK/rootfs" "$2" /bin/sleep 600 >/dev/null
  t1=$(now_us)
  echo $((t1 - t0))
}
remove() {
  ctr_ task kill -s SIGKILL "$1" >/dev/null
  for _ in $(seq 100); do ctr_ task rm "$1" >/dev/null 2>&1 && break; sleep 0.05; done
  ctr_ containers rm "$1" >/dev/null
}
stats() { # values... -> "median min max" in ms
  printf '%s\n' "$@" | sort -n | awk '{v[NR]=$1} END {printf "%.1f %.1f %.1f", v[int((NR+1)/2)]/1000, v[1]/1000, v[NR]/1000}'
}

# Warm up both (binaries and page cache), then interleave.
for rt in $LAZYBD $RUNC; do start_once "$rt" warm >/dev/null; remove warm; done
ours=() theirs=()
for i in $(seq "$ROUNDS"); do
  ours+=("$(start_once $LAZYBD "lz-$i")"); remove "lz-$i"
  theirs+=("$(start_once $RUNC "rc-$i")"); remove "rc-$i"
done
read -r o_med o_min o_max <<<"$(stats "${ours[@]}")"
read -r t_med t_min t_max <<<"$(stats "${theirs[@]}")"

# Mean Rss and Pss (KiB) of the shims of one binary serving us. Rss counts
# the binary's pages in every shim; Pss shares them out, which is what a node
# running many shims pays.
shim_mem_kb() { # binary name field(Rss|Pss)
  local sum=0 n=0 pid
  for pid in $(pgrep -f "$1 .*-address $STACK/containerd/containerd.sock"); do
    sum=$((sum + $(awk -v f="$2:" '$1 == f {print $2}' "/proc/$pid/smaps_rollup")))
    n=$((n + 1))
  done
  [ "$n" -gt 0 ] && echo $((sum / n)) || echo 0
}
for i in $(seq "$KEEP"); do
  ctr_ run -d --runtime $LAZYBD --rootfs "$STACK/rootfs" "keep-lz-$i" /bin/sleep 600 >/dev/null
  ctr_ run -d --runtime $RUNC --rootfs "$STACK/rootfs" "keep-rc-$i" /bin/sleep 600 >/dev/null
done
sleep 1
o_rss=$(shim_mem_kb containerd-shim-lazybd-v2 Rss)
t_rss=$(shim_mem_kb containerd-shim-runc-v2 Rss)
o_pss=$(shim_mem_kb containerd-shim-lazybd-v2 Pss)
t_pss=$(shim_mem_kb containerd-shim-runc-v2 Pss)

echo
echo "start latency (ctr run -d, ms; median [min-max] of $ROUNDS):"
echo "  containerd-shim-lazybd-v2  $o_med [$o_min-$o_max]"
echo "  containerd-shim-runc-v2    $t_med [$t_min-$t_max]"
awk -v a="$o_med" -v b="$t_med" 'BEGIN {printf "  ratio lazybd/runc-v2       %.2fx\n", a/b}'
echo "shim memory (KiB, mean of $KEEP shims of each): Rss / Pss"
echo "  containerd-shim-lazybd-v2  $o_rss / $o_pss"
echo "  containerd-shim-runc-v2    $t_rss / $t_pss"
awk -v a="$o_rss" -v b="$t_rss" -v c="$o_pss" -v d="$t_pss" \
  'BEGIN {printf "  ratio lazybd/runc-v2       %.2fx / %.2fx\n", a/b, c/d}'
