#!/usr/bin/env bash
# The soak (tests/tests/soak.rs at full size): through a pair of sidecars with mesh mTLS, 8,000
# connections held for 10 minutes while 1,000 new connections per second open and close and a
# byte-checked transfer runs; certificates re-issued, intentions changed and the CA rolled over
# during it. Writes perf-reports/<date>-soak.md. Needs root. Run it alone on the machine.
#   bench/soak.sh [SECONDS] [HELD] [RATE]     (defaults: 600 8000 1000)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-600}
held=${2:-8000}
rate=${3:-1000}
bash scripts/deps.sh test
# 1,000 connections per second stay in the connection tracking table for TIME_WAIT (120 s), on
# both pods' redirects: room for them.
if [ "$(sysctl -n net.netfilter.nf_conntrack_max)" -lt 1048576 ]; then
  sysctl -q -w net.netfilter.nf_conntrack_max=1048576
fi
report=perf-reports/$(date -u +%Y-%m-%d)-soak.md
figures=$(mktemp)
cargo build --profile ci --workspace --bins
out=$(mktemp)
trap 'rm -f "$figures" "$out"' EXIT
status=0
CI=true RINGSIDE_SOAK_SECS=$secs RINGSIDE_SOAK_HELD=$held RINGSIDE_SOAK_RATE=$rate \
  RINGSIDE_SOAK_REPORT=$figures \
  cargo test --profile ci -p ringside-tests --test soak -- --nocapture 2>&1 | tee "$out" || status=$?
[ -s "$figures" ] || { echo "the soak wrote no figures" >&2; exit 1; }
{
  echo "# Soak: $held held connections, $rate new per second, $secs s, through two sidecars with mesh mTLS"
  echo
  echo "$(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, kernel $(uname -r). Command: \`bench/soak.sh $secs $held $rate\`."
  echo "Client and server apps, both sidecars and the daemon share the machine."
  echo
  cat "$figures"
  echo
  if [ "$status" -eq 0 ]; then
    echo "Result: every check of the soak passed."
  else
    echo "Result: the soak's checks FAILED:"
    echo
    grep -A1 "panicked at" "$out" | grep -v -e "panicked at" -e "^--" | sed 's/^/    /'
  fi
} > "$report"
echo "wrote $report"
exit "$status"
