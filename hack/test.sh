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
echo "== tests (unit + integration; integration tests need root)"
cargo test --workspace --locked -- --test-threads="${LAZYBD_TEST_THREADS:-2}"
# Fuzzing needs a sanitizer build of its own crate (10-20 min on 2 cores),
# more than the CI budget leaves: it runs when asked for, with
# LAZYBD_FUZZ_SECONDS=N (0: every target's seeds once, as regression
# inputs), and by hand with hack/fuzz.sh SECONDS [TARGET].
if [ -n "${LAZYBD_FUZZ_SECONDS:-}" ]; then
  echo "== fuzz ($LAZYBD_FUZZ_SECONDS s per target)"
  hack/fuzz.sh "$LAZYBD_FUZZ_SECONDS"
else
  echo "== fuzz: not run (LAZYBD_FUZZ_SECONDS=0 runs the seeds, N fuzzes N s per target)"
fi
