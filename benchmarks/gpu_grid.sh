#!/usr/bin/env bash
# Issue 18's GPU grid: the depth study (plain/residual x 20/32/44/56/110, 3 seeds) on the JPEG
# CIFAR-10 with the paper's recipe on a 4x shorter schedule (16k steps, lr /10 at 8k and 12k;
# 45k/5k split, batch 128, SGD 0.9, wd 1e-4, lr 0.1, 400 warm-up steps at 0.01 for the 110-layer
# nets), float32, the seeds of each net packed in one program (`resnet-jax ablate --pack`).
#
# One call trains the next chunk that fits in BUDGET_S seconds (default 450: one ~8-minute
# command, timeout_s=600) and skips the runs already finished in DONE_DIR (the results of earlier
# chunks, committed there), so every session with a GPU runs the same command:
#
#   prepare here (once per session):  mkdir -p .data && cp ../shared/data/cifar10-jpeg.tar.gz .data/
#       (.data/ and .whl/ must be ignored: echo /.data/ >> .git/info/exclude), and in .whl/ the
#       wheels of what the GPU image lacks: bash benchmarks/gpu_wheels.sh
#   run there: bash benchmarks/gpu_grid.sh        (carry .data and .whl; timeout_s=600)
#   then here: mkdir -p docs/results/gpu-grid-16k/runs &&
#       tar -xzf OUT/gpu_grid_runs.tar.gz -C docs/results/gpu-grid-16k/runs   (DONE_DIR: each chunk
#       adds its runs there, so the next call skips them), then the whole grid's report:
#       resnet-jax report docs/results/gpu-grid-16k/runs --no-analysis --out docs/results/gpu-grid-16k
#       and commit.
#
# Jobs, shallow first: each 20..56 net's 3 seeds packed in one job (6.1M images); each 110-layer
# seed alone (3 packed would outrun one command). Estimated from the H200 speeds of the library's
# train step (float32, 100 steps per call: ResNet-20 52k img/s, -56 19k, -110 9.6k; about
# 0.6 + 0.93 * depth microseconds per image) with no gain from packing, then rescaled by what the
# chunk's finished jobs really took. ~51 minutes of training in all: 6-8 calls.
#
# PACKBENCH=1 first times packing itself (benchmarks/pack_speed.py, ResNet-20/56/110, img/s per
# seed packed vs alone) into pack_speed.txt; PACK=0 trains the seeds one after another instead.
#
# Back under $OUT (at most 8 files): log.txt, pack_speed.txt, gpu_grid_runs.tar.gz (per run: config.json,
# versions.json, metrics.jsonl, ablate log; the chunk's report table and Figure 6) and, while each
# file stays under 15 MiB, gpu_grid_ckpt_N.tar.gz with the runs' final checkpoints.
#
# SMOKE=1: the same path on CPU in under a minute: ResNet-8 on the bundled Fashion-MNIST sample,
# 6 steps, 3 seeds packed, then one seed alone if the 45 s budget allows (else skipped, as a job
# that does not fit would be).
set -u
OUT=${OUT:-/tmp/gpu_grid_out}
. "$(dirname "$0")/gpu_common.sh"  # $OUT, $LOG, $PY, say, run, carried wheels

if [ "${SMOKE:-0}" = 1 ]; then
  ROOT=${ROOT:-/tmp/gpu_grid_smoke}
  DONE_DIR=${DONE_DIR:-/nonexistent}
  BUDGET_S=${BUDGET_S:-45}
  STEPS=6
  # A packed job and a one-seed job (as the 110-layer ones), each a process of its own.
  JOBS=${JOBS:-"residual:8:0,1,2 plain:8:0"}
  COMMON=(--config mini
          "--config.train.num_steps=$STEPS" --config.train.log_every=3
          --config.train.eval_every=6 --config.train.checkpoint_every=3
          "--config.optim.boundaries=(2,4)" --config.optim.schedule=piecewise
          --config.train.eval_batch_size=250 --config.train.async_checkpoints=false)
  US_PER_IMG=(20 60)  # CPU: microseconds per image = a + b * depth, rough
else
  ROOT=${ROOT:-$PWD/runs/gpu_grid}
  DONE_DIR=${DONE_DIR:-docs/results/gpu-grid-16k/runs}
  BUDGET_S=${BUDGET_S:-450}
  STEPS=16000
  JOBS=${JOBS:-"residual:20:0,1,2 plain:20:0,1,2 residual:32:0,1,2 plain:32:0,1,2
    residual:44:0,1,2 plain:44:0,1,2 residual:56:0,1,2 plain:56:0,1,2
    residual:110:0 plain:110:0 residual:110:1 plain:110:1 residual:110:2 plain:110:2"}
  DATA=${DATA:-}
  for d in .data/cifar10-jpeg.tar.gz shared/data/cifar10-jpeg.tar.gz \
           ../shared/data/cifar10-jpeg.tar.gz; do
    [ -z "$DATA" ] && [ -f "$d" ] && DATA=$PWD/$d
  done
  [ -n "$DATA" ] || { say "no cifar10-jpeg.tar.gz (set DATA or copy it to .data/)"; exit 1; }
  COMMON=(--config cifar10
          "--config.train.num_steps=$STEPS" "--config.optim.boundaries=(8000,12000)"
          --config.data.source=folder "--config.data.data_dir=$DATA")
  US_PER_IMG=(0.6 0.93)
fi
BATCH=128
[ "${SMOKE:-0}" = 1 ] && BATCH=32
# PACK=0: the seeds one after another (--no-pack), e.g. if packing turns out slower there.
[ "${PACK:-1}" = 1 ] && COMMON+=(--pack) || COMMON+=(--no-pack)
mkdir -p "$ROOT"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$LOG"
$PY - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib.metadata as m
for p in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "ml_collections",
          "tensorboardX"):
    try: print(p, m.version(p))
    except Exception as e: print(p, "MISSING", e)
import jax; print(jax.devices())
EOF

if [ "${PACKBENCH:-0}" = 1 ]; then
  # Issue 18's question: img/s per seed, 3 seeds packed vs one alone (~2-3 min of the budget).
  if [ "${SMOKE:-0}" = 1 ]; then PB=(--depths 8 --batch-size 32 --calls 2)
  else PB=(--depths 20,56,110 --batch-size 128 --steps-per-call 100 --calls 3); fi
  say "pack_speed ${PB[*]}"
  timeout 300 $PY benchmarks/pack_speed.py --runs 3 "${PB[@]}" 2>&1 | tee -a "$LOG" "$OUT/pack_speed.txt"
fi

# A finished run: its metrics.jsonl has a test record at the last step.
finished() {
  local m=$1/metrics.jsonl
  [ -f "$m" ] && grep -q "\"step\": $STEPS, \"split\": \"test\"" "$m"
}
estimate() {  # seconds for DEPTH and NSEEDS: images x time per image, + 40 s to start/compile
  $PY -c "print(int($2 * $STEPS * $BATCH * (${US_PER_IMG[0]} + ${US_PER_IMG[1]} * $1) / 1e6 + 40))"
}
FACTOR=1.0
for job in $JOBS; do
  IFS=: read -r kind depth seeds <<<"$job"
  todo=()
  for s in ${seeds//,/ }; do
    finished "$DONE_DIR/$kind${depth}_seed$s" || finished "$ROOT/$kind${depth}_seed$s" \
      || todo+=("$s")
  done
  [ ${#todo[@]} = 0 ] && { say "finished already: $kind$depth seeds $seeds"; continue; }
  seedlist=$(IFS=,; echo "${todo[*]}")
  base=$(estimate "$depth" "${#todo[@]}")
  est=$($PY -c "print(int($base * $FACTOR))")
  left=$(( BUDGET_S - ($(date +%s) - T0) ))
  if [ "$est" -gt "$left" ]; then
    say "skip $kind$depth seeds $seedlist: ~${est}s estimated, ${left}s left"
    continue
  fi
  say "train $kind$depth seeds $seedlist (~${est}s estimated, ${left}s left)"
  start=$(date +%s)
  # SIGTERM at the budget's end: the runs save a checkpoint and stop (resumable on this machine).
  timeout -s TERM $(( left + 30 )) $PY -m resnet_jax.cli ablate "${COMMON[@]}" \
    --workdir "$ROOT" --depths "$depth" --kinds "$kind" --seeds "$seedlist" \
    "--config.train.batch_size=$BATCH" 2>&1 | tee -a "$LOG" | grep -v "train:" || true
  took=$(( $(date +%s) - start ))
  FACTOR=$($PY -c "print(round(max($took / $base, 0.2), 3))")
  say "done $kind$depth seeds $seedlist in ${took}s (estimates now x$FACTOR)"
done

say "report of this machine's runs"
$PY -m resnet_jax.cli report "$ROOT" --no-analysis 2>&1 | tee -a "$LOG"
( cd "$ROOT" && tar -czf "$OUT/gpu_grid_runs.tar.gz" --exclude=checkpoints --exclude=tensorboard \
    --exclude='*.corrupt' . ) && say "wrote gpu_grid_runs.tar.gz ($(du -h "$OUT/gpu_grid_runs.tar.gz" | cut -f1))"
# Final checkpoints, in files under 15 MiB (at most 5: 8 files come back in all).
n=0; batch=()
flush() {
  [ ${#batch[@]} = 0 ] && return
  n=$((n + 1)); ( cd "$ROOT" && tar -czf "$OUT/gpu_grid_ckpt_$n.tar.gz" "${batch[@]}" ); batch=()
}
size=0
for run in "$ROOT"/*/; do
  run=$(basename "$run"); finished "$ROOT/$run" || continue
  last=$(ls "$ROOT/$run/checkpoints" 2>/dev/null | grep -E '^[0-9]+$' | sort -n | tail -1)
  [ -n "$last" ] || continue
  kb=$(du -sk "$ROOT/$run/checkpoints/$last" | cut -f1)
  [ $(( size + kb )) -gt 14000 ] && { flush; size=0; }
  [ "$n" -ge 5 ] && { say "no room for more checkpoints ($run on)"; break; }
  batch+=("$run/checkpoints/$last"); size=$(( size + kb ))
done
flush
say "done: $n checkpoint file(s); $(ls "$OUT" | tr '\n' ' ')"
