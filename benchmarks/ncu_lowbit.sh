#!/usr/bin/env bash
# Nsight Compute on the low-bit paths whose targets are missed: W4A4 u8 IMMA GEMM and torch._int_mm at
# M = 4096 (8192 x 8192), W2A8 at M = 1 (4096 x 11008) through the u8 and bit-plane GEMVs, and the
# activation quantize-and-pack kernel. Run from the repo root on the GPU machine with $OUT set
# (< 120 s); writes $OUT/ncu_lowbit.txt. Same conventions as benchmarks/ncu_gemv.sh.
set -uo pipefail
: "${OUT:?set OUT to the output directory}"
export PYTHONPATH="${PYTHONPATH:-src}"
mkdir -p "$OUT"
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[ -n "$NCU" ] || { echo "ncu not found" | tee "$OUT/ncu_lowbit.txt"; exit 1; }

timeout 115 "$NCU" --clock-control none --profile-from-start off --nvtx \
  --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \
  python3 - <<'PY' 2>&1 | tee "$OUT/ncu_lowbit.txt"
import sys

import torch

sys.path.insert(0, "bench")
from ncu_profile import profile

from qtool import kernels


def packed(n, k, bits, layout):
    codes = torch.randint(0, 2**bits, (n, k), device="cuda")
    scales = torch.rand(n, 1, device="cuda") + 0.5
    zeros = torch.full((n, 1), float(2 ** (bits - 1)), device="cuda")
    return kernels.pack_lowbit(codes, bits, scales, zeros, None, None, layout)


w4 = packed(8192, 8192, 4, "u8")
x_big = torch.randn(4096, 8192, device="cuda", dtype=torch.float16)
a_big = kernels.quantize_activations(x_big, 4, w4.segments, "u8")
i8a = torch.randint(-128, 127, (4096, 8192), device="cuda", dtype=torch.int8)
i8b = torch.randint(-128, 127, (8192, 8192), device="cuda", dtype=torch.int8)
w2u = packed(4096, 11008, 2, "u8")
w2p = packed(4096, 11008, 2, "planes")
x1 = torch.randn(1, 11008, device="cuda", dtype=torch.float16)
a1u = kernels.quantize_activations(x1, 8, w2u.segments, "u8")
a1p = kernels.quantize_activations(x1, 8, w2p.segments, "planes")
runs = {
    "w4a4_u8_gemm_m4096": lambda: kernels.u8_gemm(a_big, w4),
    "int_mm_m4096": lambda: torch._int_mm(i8a, i8b.T),
    "quantize_act_m4096": lambda: kernels.quantize_activations(x_big, 4, w4.segments, "u8"),
    "w2a8_u8_gemv_m1": lambda: kernels.u8_gemm(a1u, w2u),
    "w2a8_bitplane_gemv_m1": lambda: kernels.bitplane_gemm(a1p, w2p),
}
profile(runs)
PY
