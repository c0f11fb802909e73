#!/usr/bin/env bash
# HTTP/1.1 keep-alive requests through ringside's L7 path (forward --protocol http) vs nginx
# proxy_pass and HAProxy mode http, vs direct (see http_compare.py). Run it alone on the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh bench
for s in haproxy nginx; do systemctl stop "$s" >/dev/null 2>&1 || true; done
cargo build --release --bin ringside --bin ringside-bench
exec python3 bench/http_compare.py "$@"
