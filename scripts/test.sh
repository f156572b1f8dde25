#!/usr/bin/env bash
# Sets everything up and runs every test: unit tests, the coordinator against fake workers,
# and the end-to-end cluster tests with real worker processes on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
# The cluster tests start the real binaries, so they are built first (setup.sh did).
cargo test --workspace --locked --release --no-fail-fast -- --test-threads="${FORGER_TEST_THREADS:-2}"
