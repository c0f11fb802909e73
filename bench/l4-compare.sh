#!/usr/bin/env bash
# L4 benchmark side by side: direct, ringside, HAProxy, nginx stream, socat (see l4_compare.py).
# Run it alone on the machine: every process shares the same cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh bench
# The Debian packages start services of their own; the benchmark starts its own instances.
for s in haproxy nginx iperf3; do systemctl stop "$s" >/dev/null 2>&1 || true; done
cargo build --release --bin ringside
exec python3 bench/l4_compare.py "$@"
