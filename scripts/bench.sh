#!/usr/bin/env bash
# Issue 4's benchmarks, side by side in one run on this machine, written to docs/BENCHMARKS.md
# between the markers (and printed):
#  1. training throughput: the plain loop in one process (`forger-worker bench`), forger with
#     1 and 2 local workers, and PyTorch DDP (gloo, CPU; scripts/ddp_bench.py) with the same
#     model, batch, worker count and total libtorch threads, for the small and article models;
#  2. the exchange alone: fake worker processes against a real coordinator, beside a plain
#     TCP copy of the same bytes (`forger-exchange allreduce`);
#  3. the coordinator's update against the machine's memory bandwidth (`forger-exchange
#     reduce-cost`);
#  4. peak resident memory of the coordinator and the workers (GNU time) for 10,000 and
#     100,000 images of the article model;
#  5. bf16 gradient compression against f32: bytes, the exchange's and training's speed, and
#     the losses of a longer run (`cluster.gradient_compression`).
# Settings (environment): FORGER_BENCH_THREADS (total threads, default 2), FORGER_BENCH_ROUNDS
#   (5: rounds of the throughput comparison, each system in turn),
#   FORGER_BENCH_STEPS_SMALL (30), FORGER_BENCH_STEPS_ARTICLE (8), FORGER_BENCH_STEPS_LOSS
#   (500, the compression section's loss runs), FORGER_BENCH_DATA
#   (../shared/data/faces), FORGER_BENCH_DEVICE (cpu; `cuda` on a GPU machine, where the DDP
#   column and the CPU-only sections are left out), FORGER_BENCH_SECTIONS (all five:
#   "throughput exchange reduce memory compression"; docs/BENCHMARKS.md is rewritten only by a
#   full CPU run).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >&2
source scripts/env.sh
bin="${CARGO_TARGET_DIR:-target}/release"
threads="${FORGER_BENCH_THREADS:-2}"
rounds="${FORGER_BENCH_ROUNDS:-5}"
device="${FORGER_BENCH_DEVICE:-cpu}"
data="$(realpath "${FORGER_BENCH_DATA:-../shared/data/faces}")"
all_sections="throughput exchange reduce memory compression"
sections="${FORGER_BENCH_SECTIONS:-$all_sections}"
if [ "$device" != cpu ]; then sections="throughput"; fi
python="$FORGER_VENV/bin/python"
work="$(mktemp -d)"
trap 'pkill -P $$ 2>/dev/null || true; rm -rf "$work"' EXIT

declare -A filters_of=([small]="64,32,16" [article]="256,128,64")

spec() { # file filters steps shards limit [gradient compression]
  cat > "$1" <<SPEC
version = 1
[data]
path = "$data"
limit = $5
[model]
d_filters = [$2]
g_filters = [$2]
dropout = 0.0
[train]
steps = $3
batch_size = 16
[cluster]
workers = $4
gradient_compression = "${6:-none}"
[checkpoint]
every = 100000
samples = 16
# Train on every image, as the single-process loop and DDP do, and time no scoring.
[quality]
held_out = 0
SPEC
}

json() { # field, from the JSON on stdin
  python3 -c "import json, sys; print(json.load(sys.stdin)$1)"
}

# Median seconds per step, leaving out the first (allocations, kernel loading), from a run
# directory's metrics.jsonl. Medians, here and below: on a shared machine, noise only ever
# adds time, in bursts that a mean takes in and a median leaves out.
cluster_step() {
  python3 - "$1" <<'PY'
import json, statistics, sys
lines = [l for l in map(json.loads, open(sys.argv[1] + "/metrics.jsonl")) if "swd" not in l][1:]
print(f'{statistics.median(l["seconds"] for l in lines):.4f}')
PY
}

median() { python3 -c "import statistics, sys; print(f'{statistics.median(map(float, sys.argv[1:])):.4f}')" "$@"; }

ratio() { python3 -c "print(f'{($1 / $2 - 1) * 100:+.1f}%')"; }
# The median over rounds of each round's own ratio, with their range: a round's runs follow each
# other, so the machine's slow spells (which last minutes) touch both sides of a ratio alike.
paired() { # "a1 a2 ..." "b1 b2 ..."
  python3 - "$1" "$2" <<'PY'
import statistics, sys
a, b = (list(map(float, side.split())) for side in sys.argv[1:3])
r = sorted((x / y - 1) * 100 for x, y in zip(a, b))
print(f"{statistics.median(r):+.1f}% ({r[0]:+.1f} to {r[-1]:+.1f})")
PY
}
rate() { python3 -c "print(f'{$1 * 16 / $2:.2f}')"; } # shards, seconds per step

out=""
add() { out+="$1"$'\n'; }

add "Measured $(date -u +%Y-%m-%d) on $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')),"
add "$(free -g | awk '/Mem:/ {print $2}') GiB memory, device $device, torch $FORGER_TORCH_VERSION, $("$bin/forger-coordinator" --version)."

if [[ " $sections " == *" throughput "* ]]; then
  add ""
  add "### Training throughput"
  add ""
  add "Batch 16 per worker, dropout 0, $threads libtorch threads in total in every column. Each figure is the"
  add "median over $rounds rounds, taken in turn (single process, forger, DDP, then again), of a run's median"
  add "step time, its first step left out. The two last columns are the median of each round's own"
  add "ratio, with the range over the rounds. forger runs --insecure here, as DDP's gloo has no"
  add "encryption; the exchange table below measures what TLS adds."
  add ""
  add "| model | workers x threads | single process s/step | forger s/step | DDP s/step | forger images/s | DDP images/s | forger vs single process | forger vs DDP (time) |"
  add "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
  for model in small article; do
    filters="${filters_of[$model]}"
    if [ "$model" = small ]; then steps="${FORGER_BENCH_STEPS_SMALL:-30}"; else steps="${FORGER_BENCH_STEPS_ARTICLE:-8}"; fi
    for workers in 1 2; do
      s="$work/$model-$workers.toml"
      spec "$s" "$filters" "$steps" "$workers" 2000
      per_worker=$((threads / workers)); [ "$per_worker" -ge 1 ] || per_worker=1
      singles=(); forgers=(); ddps=()
      for round in $(seq "$rounds"); do
        singles+=("$("$bin/forger-worker" bench --spec "$s" --steps "$steps" --threads "$threads" --device "$device" \
          2>/dev/null | json '["median_step_seconds"]')")
        rm -rf "$work/run-$model-$workers"
        "$bin/forger-coordinator" --spec "$s" --out "$work/run-$model-$workers" --listen 127.0.0.1:0 --insecure \
          --local-workers "$workers" --local-worker-threads "$per_worker" --local-worker-device "$device" 2>/dev/null
        forgers+=("$(cluster_step "$work/run-$model-$workers")")
        if [ "$device" = cpu ]; then
          ddps+=("$("$python" scripts/ddp_bench.py --workers "$workers" --threads "$per_worker" --steps "$steps" \
            --filters "$filters" 2>/dev/null | json '["median_step_seconds"]')")
        fi
      done
      single=$(median "${singles[@]}"); forger=$(median "${forgers[@]}")
      if [ "$device" = cpu ]; then
        ddp=$(median "${ddps[@]}")
        ddp_rate=$(rate "$workers" "$ddp"); vs_ddp=$(paired "${forgers[*]}" "${ddps[*]}")
      else
        ddp="n/a"; ddp_rate="n/a"; vs_ddp="n/a"
      fi
      add "| $model | $workers x $per_worker | $single | $forger | $ddp | $(rate "$workers" "$forger") | $ddp_rate | $(paired "${forgers[*]}" "${singles[*]}") | $vs_ddp |"
      echo "measured throughput: $model, $workers worker(s)" >&2
    done
  done
fi

if [[ " $sections " == *" exchange "* ]]; then
  add ""
  add "### The exchange alone"
  add ""
  add "Fake worker processes (no libtorch) upload every network's gradient and take the broadcast"
  add "back through a real coordinator, both networks every step; the TCP row copies the same bytes"
  add "each way over loopback with plain sockets. 20 steps, first left out. \"forger\" runs --insecure,"
  add "like the TCP copy; \"TLS\" is the default of a real cluster (TLS 1.3, the job token), in the same run."
  add ""
  add "| model | workers | MB each way per worker | forger ms/step | forger GB/s | TLS ms/step | TLS GB/s | TCP ms/round | TCP GB/s | forger / TCP | TLS / TCP |"
  add "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
  for model in small article; do
    filters="${filters_of[$model]}"
    for workers in 1 2; do
      "$bin/forger-exchange" allreduce --workers "$workers" --steps 20 --filters "$filters" --data "$data" \
        > "$work/exchange.json" 2>/dev/null
      "$bin/forger-exchange" allreduce --workers "$workers" --steps 20 --filters "$filters" --data "$data" \
        --tls --no-tcp > "$work/exchange-tls.json" 2>/dev/null
      add "$(python3 - "$work/exchange.json" "$work/exchange-tls.json" "$model" "$workers" <<'PY'
import json, sys
r, s = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
e, tls, t = r["exchange"], s["exchange"], r["tcp"]
mb = e["gradient_bytes_per_step"] / e["workers"] / 1e6
print(f'| {sys.argv[3]} | {sys.argv[4]} | {mb:.1f} | {e["mean_step_s"] * 1e3:.1f} | {e["gb_per_s"]:.2f} | '
      f'{tls["mean_step_s"] * 1e3:.1f} | {tls["gb_per_s"]:.2f} | '
      f'{t["mean_round_s"] * 1e3:.1f} | {t["gb_per_s"]:.2f} | {r["exchange_vs_tcp"]:.2f} | '
      f'{tls["gb_per_s"] / t["gb_per_s"]:.2f} |')
PY
)"
      echo "measured the exchange: $model, $workers worker(s)" >&2
    done
  done
fi

if [[ " $sections " == *" reduce "* ]]; then
  add ""
  add "### The coordinator's update"
  add ""
  add "\`forger_common::average::update_network\` (shard-order mean, RMSProp, batch-norm averages)"
  add "on 2 shards' gradients, one thread, median of 20; bytes touched = (2 gradients read + parameters"
  add "and mean square read and written + the mean written) x 4. Memory bandwidth: a 256 MB copy."
  add ""
  add "| model | network | values | ms | GB/s touched | memory copy GB/s (read + write) | fraction |"
  add "| --- | --- | --- | --- | --- | --- | --- |"
  for model in small article; do
    filters="${filters_of[$model]}"
    "$bin/forger-exchange" reduce-cost --workers 2 --filters "$filters" > "$work/reduce.json" 2>/dev/null
    add "$(python3 - "$work/reduce.json" "$model" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
copy = r["memory_copy"]["gb_per_s_read_plus_write"]
for net in ("discriminator", "generator"):
    u = r["update_network"][net]
    print(f'| {sys.argv[2]} | {net} | {u["values"]:,} | {u["median_s"] * 1e3:.2f} | {u["gb_per_s"]:.1f} | '
          f'{copy:.1f} | {u["gb_per_s"] / copy:.2f} |')
PY
)"
  done
  echo "measured the update" >&2
fi

if [[ " $sections " == *" memory "* ]]; then
  add ""
  add "### Peak resident memory"
  add ""
  add "The article model, 2 worker processes of 1 thread, 3 steps, peak RSS from GNU time. The"
  add "prepared dataset is 40 x 40 x 3 bytes per image; one copy of the parameters is 21.5 MB. The"
  add "bound is issue 4's: twice (prepared dataset + 3 copies of the parameters: master,"
  add "optimizer state, one reduce buffer). The single-process loop on 64 images is libtorch's"
  add "baseline with the model and its activations."
  add ""
  s="$work/baseline.toml"
  spec "$s" "${filters_of[article]}" 3 1 64
  /usr/bin/time -f '%M' -o "$work/baseline.rss" "$bin/forger-worker" bench --spec "$s" --steps 3 --threads 1 \
    --device cpu >/dev/null 2>&1
  baseline=$(( $(tail -1 "$work/baseline.rss") / 1024 ))
  add "| images | coordinator peak MB | prepared dataset MB | bound MB | worker peak MB (each) | shard MB per worker | single-process loop, 64 images, MB |"
  add "| --- | --- | --- | --- | --- | --- | --- |"
  for images in 10000 100000; do
    folder="$work/faces-$images"
    mkdir -p "$folder"
    # The shared faces, linked over and over under new names: real images, no copies on disk.
    python3 - "$data" "$folder" "$images" <<'PY'
import os, sys
source, folder, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
files = sorted(f for f in os.listdir(source) if not f.startswith("."))
for i in range(count):
    name = files[i % len(files)]
    os.symlink(os.path.join(source, name), os.path.join(folder, f"{i:06d}-{name}"))
PY
    s="$work/memory-$images.toml"
    spec "$s" "${filters_of[article]}" 3 2 0
    sed -i "s|^path = .*|path = \"$folder\"|" "$s"
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    /usr/bin/time -f '%M' -o "$work/coordinator.rss" "$bin/forger-coordinator" --spec "$s" \
      --out "$work/run-memory-$images" --listen "127.0.0.1:$port" --insecure 2>"$work/coordinator.log" &
    coordinator=$!
    for w in 1 2; do
      /usr/bin/time -f '%M' -o "$work/worker-$w.rss" "$bin/forger-worker" --coordinator "http://127.0.0.1:$port" \
        --threads 1 --device cpu --insecure 2>"$work/worker-$w.log" &
    done
    if ! wait "$coordinator"; then
      echo "the memory run with $images images failed:" >&2
      tail -20 "$work/coordinator.log" >&2
      exit 1
    fi
    wait
    coordinator_mb=$(( $(tail -1 "$work/coordinator.rss") / 1024 ))
    workers_mb="$(( $(tail -1 "$work/worker-1.rss") / 1024 )), $(( $(tail -1 "$work/worker-2.rss") / 1024 ))"
    add "$(python3 - "$images" "$coordinator_mb" "$workers_mb" "$baseline" <<'PY'
import sys
images, coordinator, workers, baseline = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
dataset = images * 40 * 40 * 3 / 1e6
params = (4_320_705 + 1_049_763) * 4 / 1e6
bound = 2 * (dataset + 3 * params)
print(f"| {images:,} | {coordinator} | {dataset:.0f} | {bound:.0f} | {workers} | {dataset / 2:.0f} | {baseline} |")
PY
)"
    rm -rf "$folder" "$work/run-memory-$images"
    echo "measured memory: $images images" >&2
  done
fi

if [[ " $sections " == *" compression "* ]]; then
  add ""
  add "### bf16 gradient compression"
  add ""
  add "\`cluster.gradient_compression = \"bf16\"\`: gradients go up as bf16 with error feedback,"
  add "parameters come back as f32. The exchange as above (20 steps; medians of 3 runs) and forger's"
  add "training step (article model, 2 workers x 1 thread, ${FORGER_BENCH_STEPS_ARTICLE:-8} steps; mean of 2 runs' median steps),"
  add "f32 and bf16 runs taking turns so that both see the same machine."
  add ""
  add "| measured | f32 | bf16 | bf16 vs f32 |"
  add "| --- | --- | --- | --- |"
  for workers in 1 2; do
    for round in 1 2 3; do
      for wire in f32 bf16; do
        flag=""; [ "$wire" = bf16 ] && flag="--bf16"
        "$bin/forger-exchange" allreduce --workers "$workers" --steps 20 --filters "${filters_of[article]}" \
          --data "$data" --no-tcp $flag > "$work/exchange-$wire-$round.json" 2>/dev/null
      done
    done
    add "$(python3 - "$work" "$workers" <<'PY'
import json, statistics, sys
work, w = sys.argv[1], sys.argv[2]
runs = {wire: [json.load(open(f"{work}/exchange-{wire}-{r}.json"))["exchange"] for r in (1, 2, 3)]
        for wire in ("f32", "bf16")}
up = {wire: runs[wire][0]["gradient_bytes_per_step"] / runs[wire][0]["workers"] / 1e6 for wire in runs}
ms = {wire: statistics.median(e["mean_step_s"] for e in runs[wire]) * 1e3 for wire in runs}
print(f'| exchange, article, {w} worker(s): MB up per worker per step | {up["f32"]:.1f} | {up["bf16"]:.1f} | '
      f'{up["bf16"] / up["f32"]:.2f} |')
print(f'| exchange, article, {w} worker(s): ms/step | {ms["f32"]:.1f} | {ms["bf16"]:.1f} | '
      f'{(ms["bf16"] / ms["f32"] - 1) * 100:+.1f}% |')
PY
)"
    echo "measured the compressed exchange: $workers worker(s)" >&2
  done
  steps="${FORGER_BENCH_STEPS_ARTICLE:-8}"
  declare -A step_sum=([none]=0 [bf16]=0)
  for round in 1 2; do
    for wire in none bf16; do
      s="$work/compressed-$wire.toml"
      spec "$s" "${filters_of[article]}" "$steps" 2 2000 "$wire"
      rm -rf "$work/run-compressed"
      "$bin/forger-coordinator" --spec "$s" --out "$work/run-compressed" --listen 127.0.0.1:0 --insecure \
        --local-workers 2 --local-worker-threads $(( threads / 2 > 0 ? threads / 2 : 1 )) --local-worker-device cpu 2>/dev/null
      step_sum[$wire]=$(python3 -c "print(${step_sum[$wire]} + $(cluster_step "$work/run-compressed"))")
    done
  done
  f32_step=$(python3 -c "print(f'{${step_sum[none]} / 2:.4f}')"); bf16_step=$(python3 -c "print(f'{${step_sum[bf16]} / 2:.4f}')")
  add "| training, article, 2 workers: s/step | $f32_step | $bf16_step | $(ratio "$bf16_step" "$f32_step") |"
  echo "measured compressed training" >&2

  loss_steps="${FORGER_BENCH_STEPS_LOSS:-500}"
  for run in none-0 bf16-0 none-1; do
    s="$work/loss-$run.toml"
    spec "$s" "${filters_of[small]}" "$loss_steps" 1 2000 "${run%-*}"
    sed -i "s|^batch_size = 16|batch_size = 16\nseed = ${run#*-}|" "$s"
    "$bin/forger-worker" bench --spec "$s" --steps "$loss_steps" --threads "$threads" --device cpu \
      > "$work/loss-$run.json" 2>/dev/null
  done
  add ""
  add "Losses of the single-process loop (which rounds exactly as the cluster does) on the small model,"
  add "$loss_steps steps, batch 16: mean over the last 100 steps. A second f32 run with another seed shows"
  add "how far two equally good runs differ."
  add ""
  add "| run | D loss | G loss |"
  add "| --- | --- | --- |"
  add "$(python3 - "$work" <<'PY'
import json, sys
for run, name in (("none-0", "f32, seed 0"), ("bf16-0", "bf16, seed 0"), ("none-1", "f32, seed 1")):
    r = json.load(open(f"{sys.argv[1]}/loss-{run}.json"))
    d, g = r["loss_d"][-100:], r["loss_g"][-100:]
    print(f"| {name} | {sum(d) / len(d):.4f} | {sum(g) / len(g):.4f} |")
PY
)"
  echo "measured compressed losses" >&2
fi

echo "$out"
# Only a full CPU run replaces the recorded tables.
if [ "$device" = cpu ] && [ "$sections" = "$all_sections" ]; then
  python3 - "$out" <<'PY'
import re, sys
path = "docs/BENCHMARKS.md"
text = open(path).read()
begin, end = "<!-- bench.sh: begin -->", "<!-- bench.sh: end -->"
new = f"{begin}\n{sys.argv[1].rstrip()}\n{end}"
text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: new, text, flags=re.S)
open(path, "w").write(text)
PY
fi
