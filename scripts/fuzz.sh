#!/usr/bin/env bash
# Fuzz the decision core with cargo fuzz (libFuzzer, nightly toolchain): protocol detection, path
# normalization and permission matching, SPIFFE IDs and certificates, the configuration file.
# Usage: scripts/fuzz.sh [SECONDS per target, default 10] [TARGET...]. A crash fails the run and
# leaves its input in core/fuzz/artifacts/. Seed corpora: core/fuzz/corpus/<target>/seed-*.
set -euo pipefail
cd "$(dirname "$0")/../core"
secs=${1:-10}
shift || true
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(detect path_match identity config)
for t in "${targets[@]}"; do
  echo "fuzz $t for ${secs}s"
  cargo +nightly fuzz run -O "$t" "fuzz/corpus/$t" -- -max_total_time="$secs" 2>&1 | tail -n 2
done
