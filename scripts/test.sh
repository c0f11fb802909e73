#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what it needs, checks formatting and lints, builds
# the binaries the end-to-end tests start, then runs every test on both event drivers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh test
cargo fmt --all -- --check
cargo clippy --profile ci --workspace --all-targets -- -D warnings
cargo build --profile ci --workspace --bins
cargo test --profile ci --workspace -- --test-threads 2
