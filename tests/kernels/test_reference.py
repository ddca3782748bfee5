"""CPU: each torch reference equals a float64 matmul of dequantized operands, and the activation
quantizer round-trips within half a step (the packers: test_layouts.py)."""

import pytest
import torch
from kernel_weights import random_weights

from qtool.kernels import make_segments, pack_lowbit, pack_wonly
from qtool.kernels.reference import (
    bitplane_gemm_ref,
    dequantize_activations,
    dequantize_wonly,
    quantize_activations_ref,
    quantize_codes,
    u8_gemm_ref,
    w_only_gemm_ref,
)


def _dequant(codes, scales, zeros, group):
    gi = torch.arange(codes.shape[1]) // (group or codes.shape[1])
    return (codes.double() - zeros.double()[:, gi]) * scales.double()[:, gi]


@pytest.mark.parametrize("layout", ["planes", "u8"])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_activation_quantizer_roundtrip_and_error(layout, bits):
    seg = make_segments(200, 64, [0, 13, 150, 200], layout)
    x = torch.randn(4, 200, dtype=torch.float64)
    a = quantize_activations_ref(x, bits, seg, layout)
    codes = quantize_codes(x, bits, seg)[0]
    assert torch.equal(a.codes(), codes)
    b = torch.tensor(seg.bounds)
    assert torch.equal(a.seg_sum.long(), torch.stack([codes[:, p:q].sum(1) for p, q in zip(b[:-1], b[1:])], 1))
    step = a.scale.double().repeat_interleave(torch.tensor([13, 137, 50]), 1)
    assert ((dequantize_activations(a) - x).abs() <= step * 0.5 + 1e-6).all()  # within half a step


def test_quantizer_by_hand():
    seg = make_segments(4, None, None, "u8")
    a = quantize_activations_ref(torch.tensor([[-1.0, 0.0, 0.5, 2.0]]), 2, seg, "u8")
    assert float(a.scale) == 1.0 and float(a.zero) == 1.0  # s = 3/3, z = rint(1/1)
    assert a.codes().tolist() == [[0, 1, 1, 3]]  # rint(0.5) = 0 (half to even, as CUDA rintf) + z
    assert a.seg_sum.tolist() == [[5]]


@pytest.mark.parametrize(
    "layout,wbits,abits",
    [("planes", 1, 1), ("planes", 2, 8), ("planes", 3, 5), ("planes", 8, 8), ("u8", 3, 4), ("u8", 4, 8), ("u8", 2, 3)],
)
@pytest.mark.parametrize("group", [64, 100, None])
def test_lowbit_refs_match_float64(layout, wbits, abits, group):
    n, k, m = 11, 300, 5
    codes, scales, zeros = random_weights(n, k, wbits, group, seed=wbits * 10 + abits)
    w = pack_lowbit(codes, wbits, scales, zeros, group, [0, 37, 140, 300], layout)
    x = torch.randn(m, k, dtype=torch.float64)
    bias = torch.randn(n, dtype=torch.float64)
    a = quantize_activations_ref(x, abits, w.segments, layout)
    expect = dequantize_activations(a) @ _dequant(codes, scales, zeros, group).T + bias
    fn = bitplane_gemm_ref if layout == "planes" else u8_gemm_ref
    y = fn(a, w, bias, out_dtype=torch.float64, compute_dtype=torch.float64)
    # terms are stored in fp32, so agreement is to ~1e-6 of the output norm, not exact
    assert (y - expect).norm() <= 1e-5 * expect.norm()


def test_lowbit_small_example_by_hand():
    # one weight row [1, 2] (2-bit, s=0.5, z=1) -> w_hat = [0, 0.5]; x = [[3, 1]] with 2-bit codes
    w = pack_lowbit(torch.tensor([[1, 2]]), 2, torch.tensor([[0.5]]), torch.tensor([[1.0]]), None, None, "planes")
    a = quantize_activations_ref(torch.tensor([[3.0, 1.0]], dtype=torch.float64), 2, w.segments, "planes")
    # x: range [1, 3] widened to include 0 -> [0, 3]: s = 1, z = 0, codes [3, 1]; y = 3*0 + 1*0.5
    assert a.codes().tolist() == [[3, 1]]
    y = bitplane_gemm_ref(a, w, out_dtype=torch.float64, compute_dtype=torch.float64)
    assert abs(float(y) - 0.5) < 1e-12
    # all-positive x = [[3, 2]]: without the widening z would be nonzero; with it s = 1, z = 0, codes [3, 2]
    a = quantize_activations_ref(torch.tensor([[3.0, 2.0]], dtype=torch.float64), 2, w.segments, "planes")
    assert a.codes().tolist() == [[3, 2]] and float(a.zero) == 0.0 and float(a.scale) == 1.0


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 128, None])
def test_wonly_ref_matches_float64(bits, group):
    codes, scales, zeros = random_weights(7, 256, bits, group)
    w = pack_wonly(codes, bits, scales, zeros, group)
    x = torch.randn(3, 256, dtype=torch.float64)
    y = w_only_gemm_ref(x, w, compute_dtype=torch.float64)
    expect = x @ _dequant(codes, scales.half().float(), zeros, group).T
    assert torch.allclose(y, expect, rtol=0, atol=1e-12)
    assert torch.allclose(dequantize_wonly(w, torch.float64), _dequant(codes, scales.half().float(), zeros, group))
