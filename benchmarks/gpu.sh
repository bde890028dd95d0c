#!/usr/bin/env bash
# The GPU suite, in under 9 minutes on a fresh GPU machine that has only this repository and
# its dependencies (PyTorch with CUDA, pybind11, scikit-build-core, cmake, ninja, pytest):
#
#   1. build and install the C++ extension (pip install --no-build-isolation --no-deps .)
#   2. learner updates/s, eager vs CUDA graph         python benchmarks/learner.py
#   3. CUDA parity tests (graphed vs eager update and acting; the async pipeline on CUDA)
#   4. Breakout-v5 end to end: raw envpool, sync and async pipelines   fastdqn bench train
#   5. a short Pong-v5 run with the async pipeline, then 10 evaluation games of its checkpoint
#
# envpool, gymnasium and ale-py are not on such a machine: prepare them here with
# `bash benchmarks/gpu_wheels.sh` (it fills the git-ignored .whl/site), carry .whl with the
# call, and this script puts .whl/site on PYTHONPATH (or installs .whl/*.whl if given wheels).
# A step that fails is recorded and the suite goes on. Results land in $OUT_DIR (default $OUT,
# the device call's folder that comes back, else benchmarks/results), named after the GPU:
# learner-<gpu>.json/.md, train-<gpu>-<start time>.json/.md, gpu-<gpu>.json (every step's status and time, the
# Pong scores; rewritten after every step) and gpu-<gpu>.log.
#
# Knobs: OUT_DIR, SITE (default .whl/site), BREAKOUT_STEPS (default 100000; all three with 16 envs), PONG_STEPS (default 2000000, cut short by
# the time left: the run is stopped with SIGTERM, as a job's time limit would, which writes a
# checkpoint where it stopped, and that is evaluated), BUDGET_S (default 520 s for the whole suite).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
# The package is installed (step 1); python -m and -c must import that, not this checkout's
# source folder, which has no compiled _core.
export PYTHONSAFEPATH=1
OUT_DIR=${OUT_DIR:-${OUT:-benchmarks/results}}
BREAKOUT_STEPS=${BREAKOUT_STEPS:-100000}
PONG_STEPS=${PONG_STEPS:-2000000}
BUDGET_S=${BUDGET_S:-520}
PY=${PY:-python3}
START=$(date +%s)
mkdir -p "$OUT_DIR"

SITE=${SITE:-$PWD/.whl/site}
if [ -d "$SITE" ]; then
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
elif compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

GPU=$($PY -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no-gpu')")
SLUG=$(echo "$GPU" | tr 'A-Z' 'a-z' | sed -E 's/nvidia//; s/[^a-z0-9]+/-/g; s/^-+|-+$//g')
LOG="$OUT_DIR/gpu-$SLUG.log"
SUMMARY="$OUT_DIR/gpu-$SLUG.json"
: > "$LOG"
STEPS_JSON=""

elapsed() { echo $(( $(date +%s) - START )); }

PONG_DIR=$(mktemp -d)/pong
PONG_STEPS_REACHED=null  # the step of the checkpoint that pong_eval scores
PONG_EVAL=null

summary() {
  cat > "$SUMMARY.tmp" <<EOF
{"suite": "gpu", "gpu": "$GPU", "date": "$(date -u +%FT%TZ)", "total_s": $(elapsed),
 "steps": {$STEPS_JSON},
 "pong_steps_requested": $PONG_STEPS, "pong_steps_reached": $PONG_STEPS_REACHED, "pong_eval": $PONG_EVAL,
 "notes": "exit 124 for pong_train: stopped by SIGTERM at its time limit, as timeout reports it (137: killed 20 s later); it then wrote a checkpoint where it stopped, which pong_eval scores"}
EOF
  mv "$SUMMARY.tmp" "$SUMMARY"
}

# step NAME TIMEOUT_S COMMAND...: run it with its output in the log, record status and seconds.
step() {
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  echo "=== [$(elapsed) s] $name (limit ${limit} s): $*" | tee -a "$LOG"
  # With STOP_SIGNAL (the Pong run), --foreground: the signal goes to the command once. Without it
  # timeout also signals its whole process group, and that second SIGTERM would stop training at
  # once, skipping its checkpoint. Other steps keep the group kill, for their child processes.
  timeout ${STOP_SIGNAL:+--foreground} -s "${STOP_SIGNAL:-INT}" -k 20 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  local took=$(( $(date +%s) - t0 ))
  echo "=== $name: exit $rc after $took s" | tee -a "$LOG"
  STEPS_JSON="$STEPS_JSON${STEPS_JSON:+,}\"$name\": {\"exit\": $rc, \"seconds\": $took}"
  summary
  return "$rc"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc;
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee -a "$LOG"

# --no-index: the machine reaches no package index, and nothing needs fetching.
step build 240 $PY -m pip install -q --no-index --disable-pip-version-check --no-build-isolation --no-deps .
step learner_bench 90 $PY benchmarks/learner.py --out "$OUT_DIR"
step cuda_tests 120 $PY -m pytest -q -p no:cacheprovider tests/test_learner.py tests/test_pipeline.py tests/test_actor_process.py -k cuda
step breakout_bench 200 $PY -m fastdqn.cli bench train --env Breakout-v5 --steps "$BREAKOUT_STEPS" --num-envs 16 --repeats 1 \
  --systems envpool_raw,sync,async --eval-episodes 0 --out "$OUT_DIR" --json

# Pong: CleanRL's dqn_atari settings, 16 envs (async batches of 8), exploration over 10% of
# PONG_STEPS, checkpoints every 250k steps; whatever time is left, less 90 s for evaluation.
# Stopped at its time limit by SIGTERM, as a job's time limit stops it (timeout reports 124),
# it stops at its next step and writes a checkpoint there. (Not SIGINT: a shell may start a
# background job with SIGINT ignored.)
left=$(( BUDGET_S - $(elapsed) - 90 ))
if [ "$left" -gt 60 ]; then
  STOP_SIGNAL=TERM step pong_train "$left" $PY -m fastdqn.cli train --env Pong-v5 --total-steps "$PONG_STEPS" --num-envs 16 \
    --pipeline async --run-dir "$PONG_DIR" --no-tensorboard --set checkpoint_interval=250000 \
    --set eval_episodes=0 --set log_interval=50000 --set save_buffer=false
  newest=$(ls "$PONG_DIR"/checkpoints/step-*.pt 2>/dev/null | tail -1)
  [ -n "$newest" ] && PONG_STEPS_REACHED=$(basename "$newest" .pt | sed -E 's/^step-0*([0-9])/\1/')
  step pong_eval 90 $PY -m fastdqn.cli eval "$PONG_DIR" --episodes 10 --json
  PONG_EVAL=$(grep -h '^{"env": "Pong-v5"' "$LOG" | tail -1)
  PONG_EVAL=${PONG_EVAL:-null}
  cp "$PONG_DIR/metrics.csv" "$OUT_DIR/pong-metrics-$SLUG.csv" 2>/dev/null
else
  echo "=== no time left for the Pong run" | tee -a "$LOG"
fi

summary
echo "=== suite done in $(elapsed) s; results in $OUT_DIR" | tee -a "$LOG"
