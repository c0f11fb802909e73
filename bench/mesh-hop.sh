#!/usr/bin/env bash
# The mesh hop at fixed request rates: client pod -> sidecar -> mTLS -> sidecar -> server pod,
# ringside vs two HAProxy sidecars doing TLS vs direct pod to pod (see mesh_hop.py). Writes
# perf-reports/<date>-mesh-hop.md with plots. Needs root. Run it alone on the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh bench
systemctl stop haproxy >/dev/null 2>&1 || true
cargo build --release --bin ringside --bin ringside-init --bin ringside-bench
exec python3 bench/mesh_hop.py "$@"
