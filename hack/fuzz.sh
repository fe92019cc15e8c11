#!/usr/bin/env bash
# Fuzzes every parser of outside input (fuzz/fuzz_targets/*.rs: the layer
# tail and index, startup traces and profiles, layer tars, P2P queries and
# headers, CNI config and environment, runtime options) for a bounded time.
#
# Usage: hack/fuzz.sh [SECONDS] [TARGET]
#   SECONDS per target (default 60); TARGET: only that one (default: all).
# hack/test.sh runs `hack/fuzz.sh 30` so regressions surface in CI; run it
# longer by hand. A crash stops the run and leaves its input in
# fuzz/artifacts/TARGET/ (reproduce: cargo fuzz run TARGET FILE); fix it
# with a regression unit test. Each run starts from fuzz/seeds/TARGET.
#
# cargo-fuzz needs nightly-only sanitizer flags; RUSTC_BOOTSTRAP lets the
# stable toolchain (the only one this project can rely on) accept them.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
only="${2:-}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1

mapfile -t targets < <(cargo fuzz list)
if [[ -n "$only" ]]; then
  if ! printf '%s\n' "${targets[@]}" | grep -qx -- "$only"; then
    echo "no fuzz target $only; there are: ${targets[*]}" >&2
    exit 2
  fi
  targets=("$only")
fi

# One build for all targets (release, with debug assertions: overflows trap).
cargo fuzz build
corpus="$(mktemp -d)"
trap 'rm -rf "$corpus"' EXIT
for t in "${targets[@]}"; do
  mkdir -p "$corpus/$t"
  if [[ -d "fuzz/seeds/$t" ]]; then
    cp fuzz/seeds/"$t"/* "$corpus/$t/"
  fi
  # libFuzzer's progress lines go to a log, shown in full only on failure.
  log="$corpus/$t.log"
  if ! cargo fuzz run "$t" "$corpus/$t" -- \
    -max_total_time="$secs" -rss_limit_mb=1024 -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
    cat "$log"
    echo "== fuzz $t FAILED: the input is in fuzz/artifacts/$t/" >&2
    exit 1
  fi
  runs="$(grep -m1 '^stat::number_of_executed_units' "$log" | awk '{print $2}')"
  rss="$(grep -m1 '^stat::peak_rss_mb' "$log" | awk '{print $2}')"
  echo "== fuzz $t: ${runs:-?} inputs in ${secs}s, peak RSS ${rss:-?} MiB"
done
