"""PackedLinear: the kernels' dequantization is the stage's 16-bit weights, kernel form holds what
kernel_nbytes counts, fused norm and residual, and concatenation of packed parts."""

from __future__ import annotations

import pytest
import torch

from qtool import kernels
from qtool.core.quantizer import fake_quant_weight, quantize_weight
from qtool.core.spec import parse_spec
from qtool.kernels import reference
from qtool.kernels.chooser import choose_layout
from qtool.runtime.packed_linear import PackedLinear
from qtool.runtime.packed_model import load_packed
from qtool.stages.pack import PackParams, pack

_GPU = pytest.param(
    "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]
)


@pytest.mark.parametrize("device", ["cpu", _GPU])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("spec", ["W2A16-g64", "W4A16-g128", "W4A16"])
def test_kernel_dequantization_is_the_stage_16_bit_weights(spec, dtype, device):
    """At large M a weight-only layer dequantizes to x's dtype (wonly_dequant) and calls cuBLAS: its
    weights must be the stage's bit for bit, as `qtool eval --dtype` makes them (fake quantization
    in fp32, then a cast). The kernel computes fp16 (q - z), exact, times the fp16 scale in fp16
    (HMUL2) or in fp32 then rounds to bf16: one rounding of the exact product, emulated below."""
    torch.manual_seed(0)
    # rows shifted off 0 give groups on one side of it, hence |q - z| = 3 at W2 (inexact products)
    w = torch.randn(96, 512) * 0.05 + torch.linspace(-0.1, 0.1, 96)[:, None]
    s = parse_spec(spec)
    stage = fake_quant_weight(w, s).to(dtype)
    linear = PackedLinear.from_codes(*quantize_weight(w, s), s, "wonly").to(device).to_kernel_form()
    g = torch.arange(w.shape[1]) // (s.group or w.shape[1])
    codes, zeros, scales = linear.codes().cpu(), linear.zeros.cpu().long(), linear.scales16.cpu()
    emulated = ((codes - zeros[:, g]).float() * scales.float()[:, g]).to(dtype)
    kernel = kernels.dequantize_weights(linear._kernel_weights(), dtype).cpu()
    for got in (emulated, kernel):
        assert torch.equal(got.view(torch.int16), stage.view(torch.int16))


@pytest.mark.parametrize(
    "spec,gpu_bits", [("W2A16-g64", 2.375), ("W4A16-g128", 4.1875), ("W3A16", None), ("W4A4", None)]
)
def test_kernel_form_holds_kernel_nbytes(spec, gpu_bits):
    """to_kernel_form keeps exactly the bytes kernel_nbytes counts (bits_per_weight_gpu), and the
    packed codes read back the same from the kernel form."""
    s = parse_spec(spec)
    codes, scale, zero = quantize_weight(torch.randn(48, 512, generator=torch.Generator().manual_seed(0)), s)
    linear = PackedLinear.from_codes(codes, scale, zero, s, choose_layout(s))
    expected = linear.kernel_nbytes
    linear.to_kernel_form()
    assert linear.nbytes == expected == linear.kernel_nbytes
    assert torch.equal(linear.codes(), codes.long())
    if gpu_bits is not None:  # weight-only, K = 512 a whole number of GEMV k-blocks: bits + 24 / group
        assert 8 * expected / codes.numel() == gpu_bits


@pytest.mark.parametrize("device", ["cpu", _GPU])
@pytest.mark.parametrize("spec", ["W2A8", "W4A16-g128", "W4A4"])
def test_packed_linear_takes_a_norm_and_a_residual(spec, device):
    """forward(x, norm=..., residual=...) = residual + forward(RMSNorm(x)): on the CPU by the same ops
    (exactly), on the GPU inside the weight-only GEMV (per-channel W2A8: on integer codes)."""
    torch.manual_seed(1)
    s = parse_spec(spec)
    w = torch.randn(192, 512) * 0.05
    linear = PackedLinear.from_codes(*quantize_weight(w, s), s, choose_layout(s)).to(device)
    dtype = torch.float16 if device != "cpu" else torch.float32
    x = (torch.randn(3, 512) * 3).to(device, dtype)
    nw, res = (torch.rand(512) + 0.5).to(device, dtype), torch.randn(3, 192).to(device, dtype)
    got = linear(x, norm=(nw, 1e-5), residual=res).double()
    expect = (res + linear(reference.rms_norm(x, nw, 1e-5))).double()
    if device == "cpu":
        assert torch.equal(got, expect)
    else:
        assert ((got - expect).norm() / expect.norm()).item() < 1e-2


def test_packed_concat_is_the_parts_side_by_side(tiny_dir, tmp_path):
    pack(PackParams(str(tiny_dir), str(tmp_path / "p"), spec="W3A16-g32"))
    attn = load_packed(tmp_path / "p").model.layers[0].self_attn
    parts = [attn.q_proj, attn.k_proj, attn.v_proj]
    dense = torch.cat([p.dequantized() for p in parts])
    fused = PackedLinear.concat(parts)
    assert torch.equal(fused.dequantized(), dense)
    assert torch.equal(torch.cat([p.dequantized() for p in parts]), dense)  # parts unchanged, now views
    assert fused.qweight.data_ptr() == attn.q_proj.qweight.data_ptr()
