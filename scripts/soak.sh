#!/usr/bin/env bash
# The soak run of docs/RELIABILITY.md: a few hundred steps while workers are killed (SIGKILL) or
# frozen (SIGSTOP) and replaced every few seconds; the result must equal an undisturbed run.
#   FORGER_SOAK_STEPS (300), FORGER_SOAK_EVERY_SECS (3), FORGER_SOAK_REPORT (a file for the table)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh   # installs libtorch and builds the binaries the test starts
source scripts/env.sh
cargo test --locked --release -p forger-tests --test soak -- --ignored --nocapture
