#!/usr/bin/env bash
# Training throughput, side by side in one run on this machine: forger with 1 and 2 local
# workers against the same loop in one process with no coordinator (`forger-worker bench`),
# for the small and the article model, with equal total libtorch threads. Prints a markdown
# table and writes it to docs/BENCHMARKS.md between the markers.
#   FORGER_BENCH_THREADS (total threads, default 2), FORGER_BENCH_STEPS_SMALL (30),
#   FORGER_BENCH_STEPS_ARTICLE (8), FORGER_BENCH_DATA (../shared/data/faces)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >&2
source scripts/env.sh
bin="${CARGO_TARGET_DIR:-target}/release"
threads="${FORGER_BENCH_THREADS:-2}"
data="$(realpath "${FORGER_BENCH_DATA:-../shared/data/faces}")"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

spec() { # name filters steps shards
  cat > "$work/$1.toml" <<SPEC
version = 1
[data]
path = "$data"
limit = 2000
[model]
d_filters = $2
g_filters = $2
dropout = 0.0
[train]
steps = $3
batch_size = 16
[cluster]
workers = $4
[checkpoint]
every = 100000
samples = 16
SPEC
  echo "$work/$1.toml"
}

# Mean seconds per step, leaving out the first (allocations, kernel loading), from a run
# directory's metrics.jsonl; and images per second over the same steps.
cluster_rate() {
  python3 - "$1" <<'PY'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")][1:]
secs = sum(l["seconds"] for l in lines)
print(f'{secs / len(lines):.4f} {sum(l["images"] for l in lines) / secs:.2f}')
PY
}

rows=()
for model in small article; do
  if [ "$model" = small ]; then filters="[64, 32, 16]"; steps="${FORGER_BENCH_STEPS_SMALL:-30}"
  else filters="[256, 128, 64]"; steps="${FORGER_BENCH_STEPS_ARTICLE:-8}"; fi
  for workers in 1 2; do
    s=$(spec "$model-$workers" "$filters" "$steps" "$workers")
    single=$("$bin/forger-worker" bench --spec "$s" --steps "$steps" --threads "$threads" --device cpu 2>/dev/null)
    single_step=$(python3 -c "import json,sys; print(f'{json.loads(sys.argv[1])[\"mean_step_seconds\"]:.4f}')" "$single")
    single_rate=$(python3 -c "import json,sys; print(f'{json.loads(sys.argv[1])[\"images_per_second\"]:.2f}')" "$single")
    per_worker=$((threads / workers)); [ "$per_worker" -ge 1 ] || per_worker=1
    "$bin/forger-coordinator" --spec "$s" --out "$work/run-$model-$workers" --listen 127.0.0.1:0 \
      --local-workers "$workers" --local-worker-threads "$per_worker" --local-worker-device cpu 2>/dev/null
    read -r cluster_step cluster_rate_value < <(cluster_rate "$work/run-$model-$workers")
    overhead=$(python3 -c "print(f'{($cluster_step / $single_step - 1) * 100:+.1f}%')")
    rows+=("| $model | $((steps - 1)) | $workers x $per_worker | $single_step | $single_rate | $cluster_step | $cluster_rate_value | $overhead |")
    echo "measured $model, $workers worker(s)" >&2
  done
done

table="$(cat <<TABLE
Measured $(date -u +%Y-%m-%d) on $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')),
torch $FORGER_TORCH_VERSION, batch 16 per shard, dropout 0, $threads libtorch threads in total
in every row, first step left out, $("$bin/forger-coordinator" --version).

| model | steps timed | workers x threads | single process s/step | single process images/s | forger s/step | forger images/s | forger vs single process |
| --- | --- | --- | --- | --- | --- | --- | --- |
$(printf '%s\n' "${rows[@]}")
TABLE
)"
echo "$table"
python3 - "$table" <<'PY'
import re, sys
path = "docs/BENCHMARKS.md"
text = open(path).read()
begin, end = "<!-- bench.sh: begin -->", "<!-- bench.sh: end -->"
new = f"{begin}\n{sys.argv[1]}\n{end}"
text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: new, text, flags=re.S)
open(path, "w").write(text)
PY
