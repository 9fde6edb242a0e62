#!/usr/bin/env bash
# The hardware counters of the kernels the first H200 run found far below the static cost model
# (docs/performance.md, "Measured on an H200"): AdamW's 8-bit state at 34 % of the copy
# bandwidth (model 78 %), 4-bit at 30 % (70 %), and Adafactor's statistics pass (its per-param
# pass was one program for a 50257 x 768 embedding on the H100: 455 us). Nsight Compute
# (ncu, on the device machine's Firecracker runtime; --clock-control none leaves the clocks as
# they are) profiles one launch of each after warm-up: speed of light, memory workload, warp
# stall reasons, shared-memory bank conflicts, occupancy. About 2 minutes; nothing installed.
# Writes $OUT/ncu-<case>.txt (OUT defaults to benchmarks/results).
# Usage from the repository root:  bash benchmarks/gpu_counters.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SECTIONS=(--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats
          --section Occupancy --section LaunchStats --section SourceCounters)

step() {  # a fastopt step on 1e7 elements, stepped 5 times: STEP <optimizer> <dtype> <options>
  cat <<EOF
import torch, fastopt
p = torch.nn.Parameter(torch.randn(10**7, device="cuda", dtype=torch.$2))
p.grad = torch.randn_like(p)
opt = getattr(fastopt, "$1")([p], $3)
for _ in range(5):
    opt.step()
torch.cuda.synchronize()
EOF
}

profile() {  # profile <case> <kernel regex> <python source>
  echo "== $1"
  timeout 120 ncu --clock-control none --kernel-name "regex:$2" --launch-skip 3 --launch-count 1 \
    "${SECTIONS[@]}" $PY -c "$3" > "$OUT/ncu-$1.txt" 2>&1
  echo "rc=$? $(wc -l < "$OUT/ncu-$1.txt") lines"
  grep -E "Memory Throughput|DRAM Throughput|Duration|Achieved Occupancy|Registers Per|Shared Memory Configuration|Bank Conflicts|Stall" "$OUT/ncu-$1.txt" | head -20
}

profile int8 "_adam_int8_kernel" "$(step AdamW float32 'lr=1e-3, state_dtype="int8"')"
profile int4 "_adam_int8_kernel" "$(step AdamW float32 'lr=1e-3, state_dtype="int4"')"
profile fp32 "_adam_kernel" "$(step AdamW float32 'lr=1e-3')"
cat > /tmp/adafactor_step.py <<'EOF'
import torch, fastopt
params = [torch.nn.Parameter(torch.randn(50257, 768, device="cuda"))]
for p in params:
    p.grad = torch.randn_like(p)
opt = fastopt.Adafactor(params, lr=1e-3)
for _ in range(5):
    opt.step()
torch.cuda.synchronize()
EOF
profile adafactor-statistics "_statistics_kernel" "$(cat /tmp/adafactor_step.py)"
