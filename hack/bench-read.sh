#!/usr/bin/env bash
# Lazy device reads vs. the same EROFS image from a plain local file, side by
# side in one run: sequential 1 MiB and random 4 KiB fio reads, every chunk
# cached, page caches dropped before each run. Needs root. Prints the ratio.
#
# Knobs (environment): BENCH_DIR (where image, blob and cache live; default
# /var/tmp, use /dev/shm to take the disk out), ROUNDS (interleaved rounds,
# median reported; default 3), LOOP_DIRECT_IO (0/1), READ_AHEAD_KB,
# FUSE_THREADS, WORKLOAD (read or randread to run only one), HANDOFF=1 (measure
# the lazy side after its loop device was switched to the local cache file).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v fio >/dev/null || { echo "bench-read: fio missing (hack/install-deps.sh installs it)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "bench-read: must run as root (loop devices, mounts)" >&2; exit 1; }
exec cargo bench -p lazybd-blockdev --bench lazy_read
