"""Low-bit GPU kernels (CUDA sources in kernels/cuda, compiled by CuPy) with torch references; which
of them runs is kernels.chooser's decision."""

from qtool.kernels.chooser import choose_layout, choose_path
from qtool.kernels.layouts import (
    LowbitWeights,
    PackedActivations,
    WOnlyWeights,
    pack_lowbit,
    pack_wonly,
)
from qtool.kernels.ops import (
    bitplane_gemm,
    dequantize_weights,
    lowbit_linear,
    quantize_activations,
    u8_gemm,
    w_only_gemm,
)
from qtool.kernels.segments import Segments, make_segments

__all__ = [
    "LowbitWeights",
    "PackedActivations",
    "Segments",
    "WOnlyWeights",
    "bitplane_gemm",
    "choose_layout",
    "choose_path",
    "dequantize_weights",
    "lowbit_linear",
    "make_segments",
    "pack_lowbit",
    "pack_wonly",
    "quantize_activations",
    "u8_gemm",
    "w_only_gemm",
]
