"""Torch references for every kernel. They follow the kernels' own arithmetic (integer dot products
per segment from bit-planes or codes, then the zero-point corrections), so a test against a float64
matmul of the dequantized operands checks the decomposition itself; on GPU they check the kernels."""

from __future__ import annotations

import torch

from qtool.core.quantizer import fake_quant_per_token, minmax_qparams
from qtool.kernels.layouts import (
    LowbitWeights,
    PackedActivations,
    WOnlyWeights,
    pack_planes,
    pack_u8_acts,
    unpack_u8_weights,
    unpack_wonly,
)
from qtool.kernels.segments import Segments


def quantize_codes(x: torch.Tensor, bits: int, seg: Segments):
    """Per-token per-cluster asymmetric codes: (codes [M,K] int64, scale [M,C], zero [M,C]) in fp32.
    Each range includes 0, as in the stages' fake quantizer (core.quantizer.minmax_qparams)."""
    qmax = float(2**bits - 1)
    xf = x.to(torch.float32)
    scales, zeros, codes = [], [], []
    for a, b in zip(seg.clusters[:-1], seg.clusters[1:]):
        part = xf[:, a:b]
        lo, hi = part.amin(1, keepdim=True).clamp_max(0), part.amax(1, keepdim=True).clamp_min(0)
        # divide by a tensor, not a Python scalar: CUDA torch turns `t / scalar` into `t * (1/scalar)`,
        # which is an ulp off the kernel's IEEE division (__fdiv_rn) for some inputs
        s = ((hi - lo) / torch.full_like(hi, qmax)).clamp_min(1e-8)
        z = torch.round(-lo / s).clamp(0, qmax)
        codes.append((torch.round(part / s) + z).clamp(0, qmax))
        scales.append(s)
        zeros.append(z)
    return torch.cat(codes, 1).to(torch.int64), torch.cat(scales, 1), torch.cat(zeros, 1)


def quantize_activations_ref(x: torch.Tensor, bits: int, seg: Segments, layout: str) -> PackedActivations:
    codes, scale, zero = quantize_codes(x, bits, seg)
    b = torch.tensor(seg.bounds, device=x.device)
    csum = torch.nn.functional.pad(codes.cumsum(1), (1, 0))
    seg_sum = (csum[:, b[1:]] - csum[:, b[:-1]]).to(torch.int32)
    data = pack_planes(codes, bits, seg) if layout == "planes" else pack_u8_acts(codes, seg)
    return PackedActivations(layout, bits, x.shape[0], x.dtype, data, scale, zero, seg_sum, seg)


def dequantize_activations(a: PackedActivations) -> torch.Tensor:
    """float64 x_hat = (q - z) * s, cluster by cluster."""
    cl = torch.tensor(
        [i for i, (p, q) in enumerate(zip(a.segments.clusters[:-1], a.segments.clusters[1:])) for _ in range(q - p)],
        device=a.scale.device,
    )
    return (a.codes().to(torch.float64) - a.zero.double()[:, cl]) * a.scale.double()[:, cl]


def _epilogue(a: PackedActivations, w: LowbitWeights, dots, bias, out_dtype, cdt):
    """sum over segments of Xa*Wa*dot - Xb*Wb - Xc*Wc, plus bias."""
    seg = w.segments
    cl = torch.tensor(seg.cluster_of, device=a.scale.device)
    sx, zx = a.scale.to(cdt)[:, cl], a.zero.to(cdt)[:, cl]  # [M, S]
    wa, wb, wc = (t.to(cdt) for t in w.terms)  # [S, N]
    y = torch.zeros(a.m, w.n, dtype=cdt, device=a.scale.device)
    for s, dot in enumerate(dots):
        y += (
            sx[:, s : s + 1] * wa[s] * dot
            - (sx[:, s] * a.seg_sum[:, s].to(cdt))[:, None] * wb[s]
            - (sx[:, s] * zx[:, s])[:, None] * wc[s]
        )
    if bias is not None:
        y += bias.to(cdt)
    return y.to(out_dtype)


def _segment_slices(seg: Segments):
    return [slice(seg.ptile[s] * seg.tile, seg.ptile[s + 1] * seg.tile) for s in range(seg.count)]


def _plane_bits(planes: torch.Tensor, cdt) -> torch.Tensor:
    """int32 planes [b, R, W] -> 0/1 [b, R, W*32] in padded order."""
    from qtool.kernels.layouts import _INVERSE_ORDER, _as_u32

    b, r, w = planes.shape
    words = _as_u32(planes).view(b, r, -1, 8)[..., _INVERSE_ORDER].reshape(b, r, w, 1)
    return ((words >> torch.arange(32, device=planes.device)) & 1).reshape(b, r, w * 32).to(cdt)


def bitplane_gemm_ref(a: PackedActivations, w: LowbitWeights, bias=None, out_dtype=None, compute_dtype=torch.float32):
    """y = sum_seg epilogue(sum_{i,j} 2^(i+j) popc(X_j AND W_i)), popcounts as 0/1 matmuls."""
    xb, wb = _plane_bits(a.data, compute_dtype), _plane_bits(w.data, compute_dtype)
    dots = []
    for sl in _segment_slices(w.segments):
        dot = 0
        for i in range(w.bits):
            for j in range(a.bits):
                dot = dot + (2 ** (i + j)) * (xb[j][:, sl] @ wb[i][:, sl].T)
        dots.append(dot)
    return _epilogue(a, w, dots, bias, out_dtype or a.dtype, compute_dtype)


def u8_gemm_ref(a: PackedActivations, w: LowbitWeights, bias=None, out_dtype=None, compute_dtype=torch.float32):
    """y = sum_seg epilogue(unsigned integer dot of the codes in the segment)."""
    from qtool.kernels.layouts import _INVERSE_ORDER

    m = a.m
    xc = a.data.to(torch.int64).view(m, -1, 8, 4)[:, :, _INVERSE_ORDER].reshape(m, -1).to(compute_dtype)
    seg = w.segments
    wc = torch.zeros(w.n, seg.padded, dtype=compute_dtype, device=w.data.device)
    wc[:, seg.positions().to(w.data.device)] = unpack_u8_weights(w.data, seg).to(compute_dtype)
    dots = [xc[:, sl] @ wc[:, sl].T for sl in _segment_slices(seg)]
    return _epilogue(a, w, dots, bias, out_dtype or a.dtype, compute_dtype)


def dequantize_wonly(w: WOnlyWeights, dtype=torch.float32) -> torch.Tensor:
    codes, scales, zeros = unpack_wonly(w)
    g = torch.arange(w.k, device=codes.device) // w.group
    return (codes.to(dtype) - zeros.to(dtype)[:, g]) * scales.to(dtype)[:, g]


def w_only_gemm_ref(x: torch.Tensor, w: WOnlyWeights, bias=None, compute_dtype=torch.float32):
    y = x.to(compute_dtype) @ dequantize_wonly(w, compute_dtype).T
    if bias is not None:
        y = y + bias.to(compute_dtype)
    return y.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm arithmetic: fp32 statistics, the weight applied in x's dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def silu_gate(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up of a fused gate|up output [..., 2I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def per_token_codes_ref(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x quantized per token as fake_quant_per_token quantizes it, returned as codes times the scale in
    float64, not rounded to x's dtype: what the SIMT GEMV's codes mode (ops.simt_mode) multiplies."""
    scale, zero = minmax_qparams(x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), 2**bits, sym=False)
    codes = torch.clamp((x.float() / scale).round() + zero, 0, 2**bits - 1) - zero
    return codes.double() * scale.double()


def wonly_prologue_ref(
    x: torch.Tensor, gated: bool = False, norm: tuple[torch.Tensor, float] | None = None, a_bits: int | None = None
) -> torch.Tensor:
    """What the fused weight-only GEMV applies to x before the product, in torch's eager ops (the
    kernel rounds the same way): SiLU gate, then RMSNorm (weight, eps), then per-token fake quantization."""
    if gated:
        x = silu_gate(x)
    if norm is not None:
        x = rms_norm(x, norm[0].to(x.dtype), norm[1])
    return fake_quant_per_token(x, a_bits) if a_bits else x
