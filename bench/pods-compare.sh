#!/usr/bin/env bash
# Pod-to-pod through two sidecars: direct vs ringside vs HAProxy sidecars (see pods_compare.py).
# Needs root. Run it alone on the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh bench
for s in haproxy nginx iperf3; do systemctl stop "$s" >/dev/null 2>&1 || true; done
cargo build --release --bin ringside --bin ringside-init
exec python3 bench/pods_compare.py "$@"
