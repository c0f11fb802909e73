#!/usr/bin/env bash
# mTLS pair: two ringside proxies (tunnel mode) vs two HAProxy instances doing mutual TLS, vs
# direct (see tls_compare.py). Run it alone on the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh bench
for s in haproxy nginx iperf3; do systemctl stop "$s" >/dev/null 2>&1 || true; done
cargo build --release --bin ringside --bin ringside-bench
exec python3 bench/tls_compare.py "$@"
