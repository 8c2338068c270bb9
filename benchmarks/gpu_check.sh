#!/usr/bin/env bash
# Issue 8's GPU check: one prepared script for a lent GPU machine (~9 min; timeout_s=600):
# versions, a preflight of the library on the image's jax, then `scripts/bench.py` for
# ResNet-20/56/110 (ours vs the PyTorch twin on the same GPU, f32 and bf16; the library's train
# step with data on the device and 100 steps per host call, projecting the paper's 64k steps),
# compile time of ResNet-20/110/1202, and the quick preset trained end to end.
# Everything goes to $OUT (log.txt and the bench JSON). SMOKE=1 runs it tiny, here on CPU.
set -u
OUT=${OUT:-/tmp/gpu_check_out}
. "$(dirname "$0")/gpu_common.sh"  # $OUT, $LOG, $PY, say, run, carried wheels
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
versions='import importlib.metadata as m
for p in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "torch", "numpy"):
    try: print(p, m.version(p))
    except Exception as e: print(p, "missing", e)'
$PY -c "$versions" 2>&1 | tee -a "$LOG"

preflight='from resnet_jax.backends.xla_flags import configure_cpu
print("flags", configure_cpu())
import jax, jax.numpy as jnp
from resnet_jax import models
m = models.create("resnet8")
print(jax.devices(), m(jnp.zeros((2, 32, 32, 3))).shape)'
if ! run 120 $PY -c "$preflight"; then
  say "preflight failed: retrying with flax 0.12.8 / optax 0.2.8 (the versions tested on CPU)"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site_fb .whl/fallback/*.whl 2>&1 | tail -2 | tee -a "$LOG"
  export PYTHONPATH=$PWD:/tmp/site_fb:/tmp/site
  if ! run 120 $PY -c "$preflight"; then
    say "still failing: retrying with JAX_PLATFORMS=cuda (no CPU flags)"
    export JAX_PLATFORMS=cuda
    run 120 $PY -c "$preflight" || { say "preflight failed; giving up"; exit 1; }
  fi
fi

if [ "${SMOKE:-0}" = 1 ]; then
  A=(--models resnet8 --windows 2 --train-steps 2 --eval-steps 2 --warmup 1 --steps-per-call 2
     --loop-calls 1 --data-steps 5)
  B=(--models resnet14 --windows 2 --train-steps 2 --eval-steps 2 --warmup 1 --steps-per-call 2
     --loop-calls 1 --data-steps 5 --compile-only-models resnet14,resnet26 --run-compile-only)
  QUICK=(--config.train.num_steps=20 --config.train.eval_every=20 --config.train.log_every=10
         --config.train.checkpoint_every=20)
else
  A=(--models resnet20,resnet56 --windows 5 --train-steps 50 --eval-steps 50 --warmup 5
     --steps-per-call 100 --loop-calls 2)
  # 50 steps per call and 3 windows: with 100 and 5 this part outran 240 s on 2026-11-30 (the
  # float32 half then took 138 s).
  B=(--models resnet110 --windows 3 --train-steps 10 --eval-steps 10 --warmup 2
     --steps-per-call 50 --loop-calls 1 --data-steps 20 --compile-only-models resnet110,resnet1202)
  QUICK=()
fi
run 240 $PY scripts/bench.py --batch-size 128 --dtypes float32,bfloat16 --vs-torch "${A[@]}" \
  --json "$OUT/bench_gpu_a.json"
run 60 $PY -m resnet_jax.train --config quick --workdir /tmp/gpu_quick "${QUICK[@]}"
run 290 $PY scripts/bench.py --batch-size 128 --dtypes float32,bfloat16 --vs-torch "${B[@]}" \
  --json "$OUT/bench_gpu_b.json"
say "done"
