#!/usr/bin/env bash
# The demo mesh: pods for an edge proxy, a frontend, a public API, a products API, payments and a
# real PostgreSQL, each with a ringside sidecar configured by `ringctl daemon`, mTLS on every hop
# and intentions (default deny plus explicit allows). Shows a request end to end with the identity
# each hop saw, a denied call and `ringctl why`, then runs until Ctrl-C and removes everything it
# created (also what a killed earlier run left behind). Needs root. `--once`: stop after the tour.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh test
cargo build --release --workspace --bins
exec ./target/release/ringside-demo "$@"
