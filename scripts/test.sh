#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what it needs, checks formatting and lints, builds
# the binaries the end-to-end tests start, then runs every test on both event drivers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh test
cargo fmt --all -- --check
cargo clippy --profile ci --workspace --all-targets -- -D warnings
cargo build --profile ci --workspace --bins
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --profile ci --workspace --no-fail-fast --lib --bins --tests -- --test-threads 2 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One summary line over every test binary.
awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed\n", p, f }' "$log"
[ "$status" -eq 0 ] || exit "$status"
# The other TLS crypto library (cargo feature aws-lc-rs; ring is the default): ringside-core's unit
# tests on it, among them the mesh configs' handshakes and refusals (tls::tests) and the provider's
# suites and groups. aws-lc-sys builds with the C compiler ring already needs.
cargo test --profile ci -p ringside-core --features aws-lc-rs --lib -- --test-threads 2
# Loom model of the upstream state the workers share (every interleaving of two workers); a cfg of
# our own, in a target directory of its own (it changes
# how ringside-core is compiled).
RUSTFLAGS="--cfg ringside_loom" CARGO_TARGET_DIR=target/loom \
  cargo test --profile ci -p ringside-core --test loom_cluster
# The fuzz targets keep building and keep finding nothing (10 s each here; longer runs by hand).
bash scripts/fuzz.sh 10
