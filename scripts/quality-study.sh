#!/usr/bin/env bash
# Settles a default the article leaves open with the quality score: trains the small variant
# (filters 64/32/16, batch 16, one worker of one thread) once per dropout rate for the same
# steps and seed, and prints each run's scores (sliced Wasserstein distance against the 512
# held-out faces, lower is better) at every checkpoint. docs/QUALITY.md records a run of it.
# Usage: scripts/quality-study.sh [OUT_DIR]   (FORGER_STUDY_STEPS, FORGER_STUDY_DROPOUTS,
#        FORGER_STUDY_SEED (0), FORGER_STUDY_PARALLEL: runs at once, default 2;
#        FORGER_STUDY_DATA: the faces)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

out="$(realpath -m "${1:-runs/quality-study-$(date +%Y%m%d-%H%M%S)}")"
steps="${FORGER_STUDY_STEPS:-3000}"
dropouts="${FORGER_STUDY_DROPOUTS:-0.0 0.3 0.6}"
parallel="${FORGER_STUDY_PARALLEL:-2}"
seed="${FORGER_STUDY_SEED:-0}"
data="$(realpath "${FORGER_STUDY_DATA:-../shared/data/faces}")"
bin="${CARGO_TARGET_DIR:-target}/release"
[ -x "$bin/forger-coordinator" ] || bash scripts/setup.sh
mkdir -p "$out"

train() { # dropout
  local run="$out/dropout-$1"
  mkdir -p "$run"
  cat > "$run.toml" <<SPEC
version = 1
[data]
path = "$data"
[model]
d_filters = [64, 32, 16]
g_filters = [64, 32, 16]
dropout = $1
[train]
steps = $steps
batch_size = 16
seed = $seed
[cluster]
workers = 1
[checkpoint]
every = 500
keep = 1
samples = 64
SPEC
  "$bin/forger-coordinator" --spec "$run.toml" --out "$run" --listen 127.0.0.1:0 --status-addr off \
    --local-workers 1 --local-worker-threads 1 --progress lines --progress-secs 60 \
    > "$run.log" 2>&1
}

running=0
for dropout in $dropouts; do
  train "$dropout" &
  running=$((running + 1))
  if [ "$running" -ge "$parallel" ]; then wait -n; running=$((running - 1)); fi
done
wait

for dropout in $dropouts; do
  python3 - "$out/dropout-$dropout" "$dropout" <<'PY'
import json, sys
run, dropout = sys.argv[1], sys.argv[2]
scores = [l for l in map(json.loads, open(run + "/metrics.jsonl")) if "swd" in l]
print(f"dropout {dropout}: " + ", ".join(f"step {s['step']} swd {s['swd']:.1f}" for s in scores))
PY
done
echo "runs, sample grids and training plots: $out"
