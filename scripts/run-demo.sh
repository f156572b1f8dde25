#!/usr/bin/env bash
# Sets everything up and runs the main job on this machine: a coordinator and two local
# worker processes train the small face DCGAN on ../shared/data/faces.
# Usage: scripts/run-demo.sh [RUN_DIR]   (default runs/faces-small-<time>)
# Any further coordinator flags can follow the run directory, e.g. --resume.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
out="${1:-runs/faces-small-$(date +%Y%m%d-%H%M%S)}"
shift || true
target="${CARGO_TARGET_DIR:-target}"
"$target/release/forger-coordinator" \
  --spec examples/faces-small.toml \
  --out "$out" \
  --listen 127.0.0.1:0 \
  --local-workers 2 "$@"
echo
echo "run directory: $out"
echo "  samples:     $out/samples/   (one grid per checkpoint)"
echo "  metrics:     $out/metrics.jsonl"
echo "  checkpoints: $out/checkpoints/"
echo "draw new faces: $target/release/forger-worker generate --checkpoint \$(ls $out/checkpoints/*.safetensors | tail -1) --count 64 --out faces.png"
