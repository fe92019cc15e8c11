#!/usr/bin/env bash
# Fuzzes every parser of outside input (fuzz/fuzz_targets/*.rs: the layer
# tail and index, startup traces and profiles, layer tars, P2P queries,
# credentials headers, tickets and replies, CNI config and environment,
# runtime options) for a bounded time.
#
# Usage: hack/fuzz.sh [SECONDS] [TARGET]
#   SECONDS per target (default 60; 0: only run fuzz/seeds/TARGET once, as
#   regression inputs); TARGET: only that one (default: all).
# hack/test.sh runs it briefly so regressions surface in CI; run it longer
# by hand. A crash stops the run and leaves its input in
# fuzz/artifacts/TARGET/ (reproduce: cargo fuzz run TARGET FILE); fix it
# with a regression unit test. Each run starts from fuzz/seeds/TARGET.
#
# All targets are built once (fuzz/target, kept between runs: a later run
# only rebuilds what changed); each run reuses that build.
# cargo-fuzz needs nightly-only sanitizer flags; RUSTC_BOOTSTRAP lets the
# stable toolchain (the only one this project can rely on) accept them.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
only="${2:-}"
if [[ ! "$secs" =~ ^[0-9]+$ ]]; then
  echo "usage: hack/fuzz.sh [SECONDS] [TARGET]" >&2
  exit 2
fi
if ! command -v cargo-fuzz >/dev/null; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --version 0.13.2 --locked
fi
export RUSTC_BOOTSTRAP=1

mapfile -t targets < <(cargo fuzz list)
if [[ -n "$only" ]]; then
  if ! printf '%s\n' "${targets[@]}" | grep -qx -- "$only"; then
    echo "no fuzz target $only; there are: ${targets[*]}" >&2
    exit 2
  fi
  targets=("$only")
fi

# One build for all targets (release, with debug assertions and overflow
# checks, AddressSanitizer: cargo-fuzz's defaults; `run` reuses it).
started=$SECONDS
cargo fuzz build
echo "== fuzz targets built in $((SECONDS - started)) s"
corpus="$(mktemp -d)"
trap 'rm -rf "$corpus"' EXIT
for t in "${targets[@]}"; do
  mkdir -p "$corpus/$t"
  if [[ -d "fuzz/seeds/$t" ]]; then
    cp fuzz/seeds/"$t"/* "$corpus/$t/"
  fi
  if ((secs == 0)); then
    budget=(-runs=0)
  else
    budget=(-max_total_time="$secs")
  fi
  # libFuzzer's progress lines go to a log, shown in full only on failure.
  log="$corpus/$t.log"
  if ! cargo fuzz run "$t" "$corpus/$t" -- \
    "${budget[@]}" -rss_limit_mb=1024 -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
    cat "$log"
    echo "== fuzz $t FAILED: the input is in fuzz/artifacts/$t/" >&2
    exit 1
  fi
  runs="$(grep -m1 '^stat::number_of_executed_units' "$log" | awk '{print $2}')"
  rss="$(grep -m1 '^stat::peak_rss_mb' "$log" | awk '{print $2}')"
  if ((secs == 0)); then
    echo "== fuzz $t: ${runs:-?} seeds ran, peak RSS ${rss:-?} MiB"
  else
    echo "== fuzz $t: ${runs:-?} inputs in ${secs} s, peak RSS ${rss:-?} MiB"
  fi
done
echo "== fuzzing done in $((SECONDS - started)) s"
