import pytest
import torch

from qtool.core.errors import QtoolError
from qtool.core.quantizer import (
    dequantize_weight,
    fake_quant_per_token,
    fake_quant_weight,
    minmax_qparams,
    quantize_weight,
    round_ste,
)
from qtool.core.spec import parse_spec


def test_asymmetric_explicit_example():
    # Row [-1, 0, 0.5, 2] at 2 bits: range [-1, 2], scale 1, zero 1; codes round(w) + 1.
    w = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    codes, scale, zero = quantize_weight(w, parse_spec("W2A16"))
    assert scale.item() == 1.0 and zero.item() == 1.0
    assert codes.tolist() == [[0, 1, 1, 3]]  # 0.5 rounds half to even -> 0, +1
    assert dequantize_weight(codes, scale, zero, 0).tolist() == [[-1.0, 0.0, 0.0, 2.0]]


def test_range_always_includes_zero():
    scale, zero = minmax_qparams(torch.tensor([1.0]), torch.tensor([4.0]), 16, sym=False)
    assert zero.item() == 0.0 and torch.isclose(scale, torch.tensor([4.0 / 15]))


def test_symmetric_and_bit_balance_levels():
    w = torch.tensor([[-3.0, -1.0, 0.4, 2.0]])
    codes, scale, zero = quantize_weight(w, parse_spec("W2*A16"))
    # 5 levels {-2..2} * absmax/2 = 1.5: -3 -> -2, -1 -> -1 (round(-0.667)), 0.4 -> 0, 2 -> 1
    assert zero.item() == 2.0 and scale.item() == 1.5
    assert (codes.int() - 2).tolist() == [[-2, -1, 0, 1]]
    codes4, scale4, zero4 = quantize_weight(w, parse_spec("W4A16-sym"))
    assert zero4.item() == 8 and scale4.item() == torch.tensor(3.0 / 7).half().item()  # fp16 scales


def test_groups_match_float64_reference_with_ragged_tail():
    torch.manual_seed(0)
    w = torch.randn(5, 200, dtype=torch.float64)
    spec = parse_spec("W3A16-g64")  # groups 64, 64, 64 and a ragged 8
    got = fake_quant_weight(w, spec)
    ref = torch.empty_like(w)
    for r in range(5):
        for start in range(0, 200, 64):
            g = w[r, start : start + 64]
            lo, hi = min(g.min().item(), 0.0), max(g.max().item(), 0.0)
            s = (hi - lo) / 7
            z = min(max(round(-lo / s), 0), 7)
            s = torch.tensor(s).half().item()  # the zero point from the range, codes with the fp16 scale
            q = torch.clamp(torch.round(g / s) + z, 0, 7)
            ref[r, start : start + 64] = (q - z) * s
    assert torch.allclose(got, ref, atol=1e-6)
    codes, scale, _ = quantize_weight(w, spec)
    assert scale.shape == (5, 4) and int(codes.max()) <= 7


def test_weight_scales_are_fp16_values_and_codes_use_them():
    torch.manual_seed(0)
    w = torch.randn(8, 256) * 0.02
    spec = parse_spec("W4A16-g64")
    raw, _ = minmax_qparams(*(w.reshape(8, 4, 64).aminmax(dim=-1)), 16, sym=False)
    assert not torch.equal(raw, raw.half().float())  # RTN ranges give scales fp16 cannot hold
    codes, scale, zero = quantize_weight(w, spec)
    assert torch.equal(scale, raw.half().float())
    assert torch.equal(codes, quantize_weight(w, spec, scale, zero)[0])  # a stored scale gives the same codes
    zeros = torch.zeros(1, 64)  # an all-zero group: a positive scale (EPS is below fp16's range), weights stay 0
    codes, scale, zero = quantize_weight(zeros, spec)
    assert scale.item() == 2.0**-24 and torch.equal(dequantize_weight(codes, scale, zero, 64), zeros)
    with pytest.raises(QtoolError, match="overflow float16"):
        quantize_weight(torch.full((1, 64), 1e6), spec)


def test_per_token_activation_quantization():
    x = torch.tensor([[[0.0, 1.0, 2.0, 3.0], [-4.0, 0.0, 4.0, 8.0]]])
    got = fake_quant_per_token(x, bits=2)
    # token 2: range [-4, 8], scale 4, zero 1 -> exact
    assert torch.equal(got[0, 1], x[0, 1])
    # token 1: range [0, 3], scale 1 -> exact as well
    assert torch.equal(got[0, 0], x[0, 0])
    heads = fake_quant_per_token(torch.tensor([[0.0, 0.9, 0.0, 90.0]]), bits=2, width=2)
    assert torch.allclose(heads, torch.tensor([[0.0, 0.9, 0.0, 90.0]]))  # one range per head keeps both


def test_round_ste_passes_gradient_straight_through():
    x = torch.tensor([0.2, 1.7, -2.5], requires_grad=True)
    y = round_ste(x)
    assert y.tolist() == [0.0, 2.0, -2.0]
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0]
