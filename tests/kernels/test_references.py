"""CPU: packers round-trip, and each torch reference equals a float64 matmul of dequantized operands."""

import pytest
import torch

from qtool.core.errors import QtoolError
from qtool.kernels import make_segments, pack_lowbit, pack_wonly
from qtool.kernels.layouts import (
    pack_interleaved,
    unpack_interleaved,
    unpack_planes,
    unpack_u8_weights,
    unpack_wonly,
)
from qtool.kernels.reference import (
    bitplane_gemm_ref,
    dequantize_activations,
    dequantize_wonly,
    quantize_activations_ref,
    quantize_codes,
    u8_gemm_ref,
    w_only_gemm_ref,
)


def _weights(n, k, bits, group, seed=0):
    g = torch.Generator().manual_seed(seed)
    ng = -(-k // (group or k))
    codes = torch.randint(0, 2**bits, (n, k), generator=g)
    scales = torch.rand(n, ng, generator=g) * 0.05 + 0.01
    zeros = torch.randint(0, 2**bits, (n, ng), generator=g).float()
    return codes, scales, zeros


def _dequant(codes, scales, zeros, group):
    gi = torch.arange(codes.shape[1]) // (group or codes.shape[1])
    return (codes.double() - zeros.double()[:, gi]) * scales.double()[:, gi]


def test_interleaved_word_layout_by_hand():
    codes = torch.tensor([[1, 2, 3, 0, 0, 0, 0, 1]])  # 4-bit: pair j = codes (2j, 2j+1) at bits 4j, 16+4j
    word = pack_interleaved(codes, 4, 1)
    assert int(word) & 0xFFFFFFFF == 1 | (2 << 16) | (3 << 4) | (1 << 28)
    assert torch.equal(unpack_interleaved(word, 4, 8), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 64, 128, None])
@pytest.mark.parametrize("k", [384, 352])  # 352: a ragged last group for 64 and 128
def test_wonly_pack_roundtrip(bits, group, k):
    codes, scales, zeros = _weights(5, k, bits, group)
    w = pack_wonly(codes, bits, scales, zeros, group)
    c, s, z = unpack_wonly(w)
    assert torch.equal(c, codes) and torch.equal(z, zeros) and torch.equal(s, scales.half().float())
    assert w.data.shape[1] % 4 == 0 and (w.hi is None) == (bits != 3)
    # the GPU holds fp16 scales and uint8 zeros: 3 bytes per group
    assert w.scales.dtype == torch.float16 and w.zeros.dtype == torch.uint8
    assert torch.equal(w.scales, scales.half()) and torch.equal(w.zeros, zeros.to(torch.uint8))
    assert w.nbytes == 4 * (w.data.numel() + (0 if w.hi is None else w.hi.numel())) + 3 * scales.numel()


def test_zero_word_is_fp16_of_1024_plus_zero():
    """The kernels build a group's word as scale bits | (0x6400 | zero) << 16 (wonly_gemv.cu sz_word):
    bits 0x6400 | z are fp16 1024 + z exactly for every uint8 zero."""
    z = torch.arange(256, dtype=torch.int32)
    half = (0x6400 | z).to(torch.int16).view(torch.float16)
    assert torch.equal(half.float(), 1024 + z.float())


@pytest.mark.parametrize("layout,bits", [("planes", 1), ("planes", 3), ("planes", 8), ("u8", 2), ("u8", 4)])
def test_lowbit_pack_roundtrip(layout, bits):
    codes, scales, zeros = _weights(9, 300, bits, 64)
    w = pack_lowbit(codes, bits, scales, zeros, 64, [0, 37, 300], layout)
    back = unpack_planes(w.data, w.segments) if layout == "planes" else unpack_u8_weights(w.data, w.segments)
    assert torch.equal(back, codes)


def test_segments_cut_at_groups_and_clusters():
    s = make_segments(300, 128, [0, 100, 300], "u8")
    assert s.bounds == (0, 100, 128, 256, 300)
    assert s.group_of == (0, 0, 1, 2) and s.cluster_of == (0, 1, 1, 1)
    assert s.ptile == (0, 4, 5, 9, 11) and s.ntiles == 12  # padded to 32-code tiles, 4-tile aligned
    assert int(s.positions()[100]) == 128


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
    codes, scales, zeros = _weights(n, k, wbits, group, seed=wbits * 10 + abits)
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
    codes, scales, zeros = _weights(7, 256, bits, group)
    w = pack_wonly(codes, bits, scales, zeros, group)
    x = torch.randn(3, 256, dtype=torch.float64)
    y = w_only_gemm_ref(x, w, compute_dtype=torch.float64)
    expect = x @ _dequant(codes, scales.half().float(), zeros, group).T
    assert torch.allclose(y, expect, rtol=0, atol=1e-12)
    assert torch.allclose(dequantize_wonly(w, torch.float64), _dequant(codes, scales.half().float(), zeros, group))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(bits=5), "support"),
        (dict(k=100), "K % 32"),
        (dict(group=96), "power-of-two"),
    ],
)
def test_wonly_rejects_unsupported(kwargs, match):
    bits, k, group = kwargs.get("bits", 4), kwargs.get("k", 256), kwargs.get("group", 64)
    codes, scales, zeros = _weights(3, k, min(bits, 8), group)
    with pytest.raises(QtoolError, match=match):
        pack_wonly(codes % 16, bits, scales, zeros, group)


def test_lowbit_rejects_bad_input():
    codes, scales, zeros = _weights(3, 64, 4, None)
    with pytest.raises(QtoolError, match="1..4-bit"):
        pack_lowbit(codes, 5, scales, zeros, None, None, "u8")
    with pytest.raises(QtoolError, match="cluster boundaries"):
        pack_lowbit(codes, 4, scales, zeros, None, [0, 40, 30, 64], "planes")
    with pytest.raises(QtoolError, match=r"\[0, 3\]"):
        pack_lowbit(codes, 2, scales, zeros, None, None, "planes")
