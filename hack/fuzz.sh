#!/usr/bin/env bash
# Fuzzes the lazybd blob parser (footer, index header, chunk table, chunk
# decode) for a bounded time. Usage: hack/fuzz.sh [SECONDS]   (default 60)
# cargo-fuzz needs nightly-only sanitizer flags; RUSTC_BOOTSTRAP lets the
# stable toolchain (the only one this project can rely on) accept them.
set -euo pipefail
cd "$(dirname "$0")/../blockdev"
secs="${1:-60}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
corpus="$(mktemp -d)"
trap 'rm -rf "$corpus"' EXIT
cp fuzz/seeds/parse_index/* "$corpus/"
RUSTC_BOOTSTRAP=1 cargo fuzz run parse_index "$corpus" -- -max_total_time="$secs" -rss_limit_mb=1024
