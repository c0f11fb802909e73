#!/usr/bin/env bash
# Fuzz with cargo fuzz (libFuzzer, nightly toolchain): protocol detection, path normalization and
# permission matching (against a reference), SPIFFE IDs and certificates, the configuration file,
# and from ringctl's library: Consul documents as `ringctl apply` reads them (round trip) and the
# CA signing CSRs (the identity in a signed leaf).
# Usage: scripts/fuzz.sh [SECONDS per target, default 10] [TARGET...]. A crash fails the run and
# leaves its input in core/fuzz/artifacts/. Seed corpora: core/fuzz/corpus/<target>/seed-*.
set -euo pipefail
cd "$(dirname "$0")/../core"
secs=${1:-10}
shift || true
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(detect path_match identity config consul csr)
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for t in "${targets[@]}"; do
  echo "fuzz $t for ${secs}s"
  status=0
  cargo +nightly fuzz run -O "$t" "fuzz/corpus/$t" -- -max_total_time="$secs" >"$log" 2>&1 || status=$?
  # The figures (executions, coverage, corpus size), or the crash and where its input was written.
  grep -E '^#[0-9]+[[:space:]]+DONE|^Done [0-9]+ runs' "$log" || true
  if [ "$status" -ne 0 ]; then
    tail -n 40 "$log"
    exit "$status"
  fi
done
