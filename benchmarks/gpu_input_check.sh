#!/usr/bin/env bash
# Issue 20's GPU check (~4 min; timeout_s=420): ResNet-50's bf16 train step on streamed 224 px
# batches (the library's jit_train_block, batch 128), the streaming input pipeline on generated
# JPEGs at 1 thread and one per CPU, and the CPU cores it needs to feed the GPU. Everything goes
# to $OUT (log.txt and the bench JSON). SMOKE=1 runs it tiny, e.g. here on CPU.
set -u
OUT=${OUT:-/tmp/gpu_input_out}
. "$(dirname "$0")/gpu_common.sh"  # $OUT, $LOG, $PY, say, run, carried wheels
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$LOG"
lscpu | grep -E "Model name|^CPU\(s\)" | tee -a "$LOG"
grep -qw avx512f /proc/cpuinfo && say "avx512f: yes" || say "avx512f: no"

if [ "${SMOKE:-0}" = 1 ]; then
  A=(--models resnet18 --batch-size 8 --image-size 32 --windows 1 --train-steps 1 --eval-steps 1
     --warmup 1 --data-steps 2 --input-images 16 --input-batches-per-thread 1)
else
  A=(--models resnet50 --batch-size 128 --windows 5 --train-steps 20 --eval-steps 20 --warmup 3
     --input-images 512)
fi
run 400 $PY scripts/bench.py --dtypes bfloat16 --steps-per-call 0 "${A[@]}" \
  --json "$OUT/bench_input.json"
say "done"
