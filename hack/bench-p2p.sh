#!/usr/bin/env bash
# P2P distribution vs every node reading the registry directly: one image
# (one layer of incompressible payload, 1 MiB chunks) to 1, 4 and 8 nodes,
# each a `lazybd mount` in its own network namespace, all reading the whole
# image at once. The registry sits behind a link shaped with tc tbf (its own
# netns on the test bridge); peers and the super node talk unshaped.
# Reports registry egress (bytes the registry sent through the link) and
# the time until every node has read everything. Needs root. A report, not
# a test (the run is tests/tests/p2p_distribution.rs `bench_p2p`).
#
# Knobs (environment): NODES (default 1,4,8), RATE (tc rate, default
# 200mbit), MIB (payload MiB, default 32).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "bench-p2p: must run as root" >&2; exit 1; }
cargo build -p lazybd-blockdev --bins
bin=$(cargo test -p lazybd-tests --no-run --test p2p_distribution 2>&1 |
  sed -n 's/.*Executable .*(\(target\/debug\/deps\/p2p_distribution-[0-9a-f]*\)).*/\1/p' | tail -1)
[ -n "$bin" ] || { echo "bench-p2p: could not build the test binary" >&2; exit 1; }
echo "image ${MIB:-32} MiB, registry link ${RATE:-200mbit}, debug build"
LAZYBD_BENCH_NODES=${NODES:-1,4,8} LAZYBD_BENCH_RATE=${RATE:-200mbit} LAZYBD_BENCH_MIB=${MIB:-32} \
  "$bin" --ignored --exact bench_p2p --nocapture --test-threads=1 2>&1 | grep -o '|.*|'
