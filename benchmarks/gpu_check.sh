#!/usr/bin/env bash
# The device check of a GPU machine, in under 8 minutes: the tests marked `cuda` (both engines
# train on CUDA as on the CPU, the ensemble, recording without a host sync per step), then the
# GPU rows of the benchmarks, each appending its own `..._gpu` / `..._cuda` section to
# benchmarks/RESULTS.md (the CPU sections measured here stay as they are). On a machine
# without CUDA it says so in one line and exits 0.
#
#   bash benchmarks/gpu_check.sh [MNIST_DIR]     # default: $GRADLAB_DATA, else ./data
#
# Exit status: 0 when every step passed (or no CUDA), 1 when one failed or ran out of time.
set -u
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
    2>/dev/null; then
  echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing run"
  exit 0
fi
DATA=${1:-${GRADLAB_DATA:-data}}
BUDGET=460  # seconds for all steps: under 8 minutes with the start-up
status=0

step() {  # step SECONDS COMMAND...: run with at most SECONDS (less if the budget is short)
  local limit=$1 left=$((BUDGET - SECONDS))
  shift
  if ((left < 20)); then
    echo "== skipped (time budget spent): $*"
    status=1
    return
  fi
  ((limit > left)) && limit=$left
  echo "== $* (at most ${limit} s; ${SECONDS} s so far)"
  timeout "$limit" "$@"
  local rc=$?
  if ((rc != 0)); then
    echo "== exit $rc$( ((rc == 124)) && echo ' (timed out)'): $*"
    status=1
  fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
step 120 python3 -m pytest -q -rs -m cuda tests
if [ -f "$DATA/MNIST/raw/train-images-idx3-ubyte" ]; then
  step 80 python3 benchmarks/bench_epoch.py --data-dir "$DATA" --reps 3 --write
  step 120 python3 benchmarks/bench_ensemble.py --data-dir "$DATA" --reps 3 --write
  step 80 python3 benchmarks/bench_flops.py --data-dir "$DATA" --reps 3 --write
  step 60 python3 benchmarks/bench_recorder.py --data-dir "$DATA" --device cuda --reps 3 \
    --window-steps 1000 --write
else
  echo "== benchmarks skipped: no MNIST in $DATA (pass its folder as the first argument)"
  status=1
fi
echo "gpu_check: done in ${SECONDS} s, exit ${status}"
exit "$status"
