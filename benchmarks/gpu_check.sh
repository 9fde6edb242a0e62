#!/usr/bin/env bash
# One prepared GPU check, about 6 minutes at most, on the device machine as it is: nothing is
# installed or fetched (its Python is python3, with torch, Triton, pytest and hypothesis).
#   1. the microbenchmark, most telling rows first (benchmarks/gpu_bench.py --budget): its
#      JSON is rewritten after every row, so a run cut short keeps what it measured;
#   2. the kernels' parity tests on CUDA (tests/test_gpu.py), one line per test as it ends;
#   3. where the default loop's time goes (benchmarks/gpu_profile.py: host and device ms, launches
#      per step, the top ops), rewritten after every optimizer.
# Writes $OUT/<gpu>.json, $OUT/gpu_tests.xml, $OUT/gpu-profile.json and $OUT/gpu_check.log
# (OUT defaults to benchmarks/results).
# Usage from the repository root:  bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
PY=${PYTHON:-python3}
LOG="$OUT/gpu_check.log"
mkdir -p "$OUT"
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1
# Run from this checkout, installed or not (fastopt finds kernels/ beside itself).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
  echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null)"
  $PY -c "import torch, triton, fastopt.kernels as k; print('torch', torch.__version__, 'triton', triton.__version__, 'kernels from', k.__file__)"
} 2>&1 | tee "$LOG"

echo "== microbenchmark (new sections stop after 100 s)" | tee -a "$LOG"
timeout 170 $PY benchmarks/gpu_bench.py --out "$OUT" --budget 100 2>&1 | tee -a "$LOG"
bench_rc=${PIPESTATUS[0]}

echo "== GPU tests" | tee -a "$LOG"
# Their time is mostly Triton compiling each specialization (one core each): on an H100 host
# 150 s ran 129 of 262 tests in one process. pytest-xdist, where the machine has it, spreads
# them over 6 processes sharing the GPU (correctness only: nothing here is timed).
WORKERS=$($PY -c "import xdist" 2>/dev/null && echo "-n 6")
timeout 150 $PY -m pytest -p no:cacheprovider tests/test_gpu.py -q -rfEs $WORKERS \
  -o console_output_style=classic --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee -a "$LOG" | tail -60
tests_rc=${PIPESTATUS[0]}

echo "== where the default loop's time goes" | tee -a "$LOG"
timeout 60 $PY benchmarks/gpu_profile.py --out "$OUT" 2>&1 | tee -a "$LOG" | grep -v "^    "

echo "bench rc=$bench_rc tests rc=$tests_rc" | tee -a "$LOG"
exit $(( tests_rc != 0 || bench_rc != 0 ))
