#!/usr/bin/env bash
# One prepared GPU check (< 6 minutes on an H100): the kernels' parity tests on CUDA, then the
# microbenchmark. Copies the results JSON and the logs to $OUT (default benchmarks/results).
# Usage on the device machine, from the repository root:  bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
unset TRITON_INTERPRET
{
  echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null)"
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} | tee "$OUT/gpu_check.log"

# Run from this checkout, installed or not (fastopt finds kernels/ beside itself).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -c "import fastopt.kernels as k; print('fastopt.kernels from', k.__file__)" 2>&1 | tee -a "$OUT/gpu_check.log"

echo "== GPU tests" | tee -a "$OUT/gpu_check.log"
timeout 200 python -m pytest -q -p no:cacheprovider tests/test_gpu.py -x -rs 2>&1 | tail -40 | tee -a "$OUT/gpu_check.log"
tests_rc=${PIPESTATUS[0]}

echo "== microbenchmark" | tee -a "$OUT/gpu_check.log"
timeout 240 python benchmarks/gpu_bench.py --out "$OUT" 2>&1 | tee -a "$OUT/gpu_check.log"
bench_rc=${PIPESTATUS[0]}
echo "tests rc=$tests_rc bench rc=$bench_rc" | tee -a "$OUT/gpu_check.log"
exit $(( tests_rc != 0 || bench_rc != 0 ))
