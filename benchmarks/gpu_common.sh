# Sourced by the GPU scripts (gpu_check.sh, gpu_grid.sh, gpu_input_check.sh) after they set
# OUT: creates $OUT, defines LOG, PY, T0, `say` (a timestamped line in the log) and `run SECONDS
# CMD...` (a command under a timeout, logged with its exit status), installs the wheels carried
# in .whl/ (benchmarks/gpu_wheels.sh fetches them) and puts this checkout first on PYTHONPATH.
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG=$OUT/log.txt
PY=${PYTHON:-python3}
T0=$(date +%s)
say() { echo "=== $(date -u +%H:%M:%S) +$(( $(date +%s) - T0 ))s $*" | tee -a "$LOG"; }
run() { local t=$1; shift; say "$*"; timeout "$t" "$@" 2>&1 | tee -a "$LOG"; say "exit ${PIPESTATUS[0]}"; }

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl 2>&1 | tail -2 | tee -a "$LOG"
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
