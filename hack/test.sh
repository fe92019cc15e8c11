#!/usr/bin/env bash
# The one test command: installs every system dependency, builds, runs lint,
# unit tests and the root integration tests against real containerd, runc,
# docker-registry, kernel mounts and network namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."

hack/install-deps.sh

# One clean build, no incremental caches: CI starts from a fresh clone, and
# incremental artefacts only double the target directory's size.
export CARGO_INCREMENTAL=0

echo "== fmt"
cargo fmt --all -- --check
echo "== clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== shellcheck"
shellcheck -x .ci/run hack/*.sh hack/lib/*.sh
echo "== deploy manifests"
hack/validate-deploy.sh
echo "== build"
cargo build --workspace --bins --locked
# The soak (tests/tests/soak.rs) runs LAZYBD_SOAK_SECONDS, 150 s by default.
echo "== tests (unit + integration; integration tests need root)"
cargo test --workspace --locked -- --test-threads="${LAZYBD_TEST_THREADS:-2}"
# Every fuzz target for a short, fixed budget (30 s each after one
# sanitizer build: 8 targets, about 14 min on 2 cores), so regressions
# surface; LAZYBD_FUZZ_SECONDS=0 runs only the seeds, N fuzzes N s per
# target. Longer runs by hand: hack/fuzz.sh SECONDS [TARGET].
echo "== fuzz (${LAZYBD_FUZZ_SECONDS:-30} s per target)"
hack/fuzz.sh "${LAZYBD_FUZZ_SECONDS:-30}"
