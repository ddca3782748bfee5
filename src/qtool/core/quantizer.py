"""Uniform integer quantization shared by every method.

One representation everywhere: unsigned integer codes q in [0, levels-1], an integer zero point z
in the same range, and an fp32 scale s; the value is (q - z) * s. Weight scales hold fp16 values
(`fp16_scale`), the precision packed checkpoints keep them in on the GPU. Symmetric quantization
is the special case z = levels // 2; ABQ-LLM's bit balance is the 5-level symmetric case. Ranges
always include 0 (as GPTQ does), so the zero point never needs clamping away from the data.
"""

from __future__ import annotations

import torch

from qtool.core.errors import QtoolError
from qtool.core.spec import QuantSpec

EPS = 1e-8
FP16_TINY = 2.0**-24  # the smallest positive fp16 value


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() in the forward pass, identity in the backward pass (straight-through estimator)."""
    return (x.round() - x).detach() + x


def clamp_codes(q: torch.Tensor, top: float) -> torch.Tensor:
    """clamp(q, 0, top) whose gradient passes at the bounds themselves, as torch.clamp's did before
    torch 2.14 (which passes none there): a code that rounds exactly to 0 or to the top keeps its
    straight-through gradient, so training does not depend on the torch release."""
    return torch.where((q >= 0) & (q <= top), q, q.detach().clamp(0, top))


def minmax_qparams(xmin: torch.Tensor, xmax: torch.Tensor, levels: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (both fp32) that map [xmin, xmax] (widened to include 0) onto the codes."""
    xmin = torch.minimum(xmin.float(), torch.zeros_like(xmin, dtype=torch.float32))
    xmax = torch.maximum(xmax.float(), torch.zeros_like(xmax, dtype=torch.float32))
    if sym:
        half = levels // 2
        # codes z-half .. z+half-1 (or z+half for odd level counts); absmax maps to the top code.
        scale = torch.maximum(xmax, -xmin).clamp(min=EPS) / max(levels - 1 - half, 1)
        zero = torch.full_like(scale, float(half))
    else:
        scale = (xmax - xmin).clamp(min=EPS) / (levels - 1)
        zero = (-xmin / scale).round().clamp(0, levels - 1)
    return scale, zero


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, levels: int) -> torch.Tensor:
    """Integer codes (as float tensor) of x; scale and zero broadcast against x."""
    return (x / scale).round().add(zero).clamp(0, levels - 1)


def fake_quant(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, levels: int, ste: bool = False
) -> torch.Tensor:
    """Quantize then dequantize, in fp32, returned in x's dtype. With ste=True gradients flow
    to x (straight-through) and to scale and zero."""
    rnd = round_ste if ste else torch.round
    q = rnd(x.float() / scale) + zero
    q = clamp_codes(q, levels - 1) if ste else q.clamp(0, levels - 1)
    return ((q - zero) * scale).to(x.dtype)


# -- weights: per output row, groups along the input dimension ------------------------------------


def to_groups(w: torch.Tensor, group: int) -> torch.Tensor:
    """[N, K] -> [N, ceil(K/group), group]; a ragged last group is padded with copies of the row's
    last value, which leaves that group's min and max unchanged. group=0 means the whole row."""
    n, k = w.shape
    g = group or k
    pad = (-k) % g
    if pad:
        w = torch.cat([w, w[:, -1:].expand(n, pad)], dim=1)
    return w.reshape(n, -1, g)


def from_groups(wg: torch.Tensor, k: int) -> torch.Tensor:
    return wg.reshape(wg.shape[0], -1)[:, :k]


def weight_qparams(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row, per-group scale and zero, each [N, n_groups] fp32 (round-to-nearest ranges)."""
    wg = to_groups(w.detach(), spec.group)
    return minmax_qparams(wg.amin(-1), wg.amax(-1), spec.w_levels, spec.w_sym)


def expand_groups(p: torch.Tensor, k: int, group: int) -> torch.Tensor:
    """[N, n_groups] -> [N, K]: each group's parameter repeated over its columns."""
    return p.repeat_interleave(group or k, dim=1)[:, :k]


def fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    """The weight scale rounded to fp16 (at least the smallest positive one), held in fp32. The
    weight-only kernels read fp16 scales; with s fp16-valued, (q - z) * s is exact in fp32, so the
    stage's weights cast to fp16 or bf16 are bit for bit what the kernels dequantize (one rounding
    of the same product) and codes are computed with the scale they are dequantized with."""
    s = scale.to(torch.float16)
    if not bool(torch.isfinite(s).all()):
        raise QtoolError(
            "weight scales overflow float16, in which packed checkpoints hold them: leave this layer unquantized"
        )
    return s.float().clamp(min=FP16_TINY)


def quantize_weight(
    w: torch.Tensor, spec: QuantSpec, scale=None, zero=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 [N,K], scale [N,G], zero [N,G]); RTN ranges unless scale/zero are given; the
    scale rounded by `fp16_scale` before the codes are computed with it."""
    if scale is None:
        scale, zero = weight_qparams(w, spec)
    scale = fp16_scale(scale)
    k = w.shape[1]
    codes = quantize(w.float(), expand_groups(scale, k, spec.group), expand_groups(zero, k, spec.group), spec.w_levels)
    return codes.to(torch.uint8), scale, zero


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    k = codes.shape[1]
    return (codes.float() - expand_groups(zero, k, group)) * expand_groups(scale, k, group)


def fake_quant_weight(w: torch.Tensor, spec: QuantSpec, scale=None, zero=None) -> torch.Tensor:
    """Weight quantization (round-to-nearest ranges unless learned scale/zero are given),
    returned dequantized in w's dtype."""
    if not spec.quantizes_weights:
        return w
    codes, scale, zero = quantize_weight(w, spec, scale, zero)
    return dequantize_weight(codes, scale, zero, spec.group).to(w.dtype)


# -- activations -------------------------------------------------------------------------------


def fake_quant_per_token(x: torch.Tensor, bits: int, width: int | None = None, ste: bool = False) -> torch.Tensor:
    """Dynamic asymmetric quantization with one range per token (per `width`-sized chunk of the
    last dimension when width is given, e.g. one range per attention head). ste=True lets
    gradients through, for block-wise training."""
    shape = x.shape
    xs = x.reshape(*shape[:-1], -1, width) if width else x.unsqueeze(-2)
    scale, zero = minmax_qparams(xs.amin(-1, keepdim=True), xs.amax(-1, keepdim=True), 2**bits, sym=False)
    return fake_quant(xs, scale, zero, 2**bits, ste=ste).reshape(shape)
