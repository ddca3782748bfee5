#!/usr/bin/env bash
# Nsight Compute on one launch each of the tensor-core (mma) and SIMT W4A16 g128 GEMV at M = 1,
# N x K = 4096 x 11008, and of torch fp16 matmul at the same shape. Run from the repo root on the GPU
# machine with $OUT set (< 120 s); writes $OUT/ncu_gemv.txt.
#   PYTHONPATH=src OUT=... bash benchmarks/ncu_gemv.sh
# Only the launches between cudaProfilerStart/Stop are profiled (--profile-from-start off): compilation
# and warm-up run first, outside; the NVTX range names (--nvtx) say which launch is which. Clocks are not
# locked (--clock-control none) so the numbers match the benchmark's; caches are flushed before each
# replay (ncu's default), so the weights come from HBM as in benchmarks/gemv_variants.py. LaunchStats is
# added to the requested sections for registers, shared memory and waves.
set -uo pipefail
: "${OUT:?set OUT to the output directory}"
export PYTHONPATH="${PYTHONPATH:-src}"
mkdir -p "$OUT"
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [ -z "$NCU" ]; then
  echo "ncu not found (PATH, /usr/local/cuda/bin, /opt/nvidia/nsight-compute)" | tee "$OUT/ncu_gemv.txt"
  exit 1
fi

timeout 115 "$NCU" --clock-control none --profile-from-start off --nvtx \
  --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \
  --section LaunchStats \
  python3 - <<'EOF' 2>&1 | tee "$OUT/ncu_gemv.txt"
import sys

import torch

sys.path.insert(0, "bench")
from gemv_variants import random_wonly
from ncu_profile import profile

from qtool.kernels import ops

n, k = 4096, 11008
w = random_wonly(n, k, 4, 128)
wf = torch.randn(n, k, device="cuda", dtype=torch.float16)
x = torch.randn(1, k, device="cuda", dtype=torch.float16)
runs = {"mma_gemv": lambda: ops.w_only_gemm(x, w, impl="mma"), "simt_gemv": lambda: ops.w_only_gemm(x, w, impl="simt"),
        "fp16_matmul": lambda: x @ wf.T}
profile(runs)
EOF
