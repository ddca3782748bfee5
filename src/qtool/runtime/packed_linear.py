"""PackedLinear: a block linear holding its weights in a kernel layout instead of floats.

On a GPU it calls the kernels (weight-only GEMV/GEMM, or activation quantize-and-pack followed by
the u8 / bit-plane GEMM): the one kernels.chooser picks for the layer's shape (`kernel_path`), in the
layout the chooser picked at pack time (`qtool.kernels.chooser.choose_layout`). On the CPU it runs the
torch reference of the same quantized product: weights dequantized from the packed codes with the
stage's fp32 scales, activations fake-quantized by the stage's own quantizer, so a packed model on the
CPU reproduces its stage exactly; so does a GPU model run in fp32 before `to_kernel_form` (`qtool eval
--dtype float32`). Where the spec quantizes the KV cache, the key and value projections quantize their
outputs the same way on both devices.
"""

from __future__ import annotations

import torch
from torch import nn

from qtool import kernels
from qtool.core.errors import QtoolError
from qtool.core.quantizer import dequantize_weight, fake_quant_per_token
from qtool.core.spec import QuantSpec
from qtool.kernels import reference
from qtool.kernels.layouts import (
    LowbitWeights,
    WOnlyWeights,
    unpack_planes,
    unpack_u8_weights,
    unpack_wonly,
)
from qtool.kernels.segments import make_segments
from qtool.quant.fakequant import ActQuantizer, fake_quant_clusters
from qtool.runtime.fusion import fused


class PackedLinear(nn.Module):
    """y = x W^T + b with W in a packed kernel layout (see kernels/cuda/README.md).

    Buffers: `qweight` (+ `qweight_hi` for 3-bit weight-only) in the layout's int32 words, `scales`
    fp32 [N, G], `zeros` uint8 [N, G], `terms` (per-segment code sums, low-bit GEMMs), `act_bounds`
    (activation clusters), `kv_bounds` (output clusters of K/V under -cluster), `bias`; in kernel form
    (`to_kernel_form`) a weight-only layer holds `scales16` (fp16, what its kernels read) for `scales`.
    """

    def __init__(
        self,
        layout: str,
        bits: int,
        in_features: int,
        out_features: int,
        group: int,
        buffers: dict,
        a_bits: int = 16,
        kv_bits: int = 16,
        head_dim: int | None = None,
    ):
        super().__init__()
        self.layout, self.bits, self.group = layout, bits, group
        self.in_features, self.out_features = in_features, out_features
        self.a_bits, self.kv_bits, self.head_dim = a_bits, kv_bits, head_dim
        for name, t in buffers.items():
            if t is not None:
                self.register_buffer(name, t)
        if "bias" not in self._buffers:
            self.bias = None
        bounds = buffers.get("act_bounds")
        self.segments = None if layout == "wonly" else make_segments(in_features, group or None, bounds, layout)
        # the stage's quantizers (host-side cluster sizes: nothing to sync in forward)
        self._in_sizes = tuple(torch.diff(self._bounds(bounds, in_features)).tolist())
        kv_bounds = buffers.get("kv_bounds")
        self._kv_quant = (
            None if kv_bits >= 16 or kv_bounds is None else ActQuantizer(kv_bits, self._bounds(kv_bounds, out_features))
        )
        self._dense = self._kw = None

    @staticmethod
    def _bounds(bounds, width: int) -> torch.Tensor:
        return torch.tensor([0, width]) if bounds is None else torch.as_tensor(bounds).cpu()

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_codes(
        cls,
        codes,
        scale,
        zero,
        spec: QuantSpec,
        layout: str,
        bias=None,
        act_bounds=None,
        kv: bool = False,
        kv_bounds=None,
        head_dim: int | None = None,
    ) -> PackedLinear:
        """Pack one linear's codes [N, K] (uint8), scales and zeros [N, G] for `layout`."""
        n, k = codes.shape
        bits, group = spec.w_storage_bits, spec.group
        if layout == "wonly":
            w = kernels.pack_wonly(codes, bits, scale, zero, group or None)
            buffers = {"qweight": w.data, "qweight_hi": w.hi}
        else:
            w = kernels.pack_lowbit(codes, bits, scale, zero, group or None, act_bounds, layout)
            buffers = {"qweight": w.data, "terms": w.terms}
        buffers.update(
            scales=scale.float().contiguous(),
            zeros=zero.to(torch.uint8).contiguous(),
            bias=bias,
            act_bounds=None if act_bounds is None else torch.as_tensor(act_bounds, dtype=torch.int32),
            kv_bounds=None if kv_bounds is None else torch.as_tensor(kv_bounds, dtype=torch.int32),
        )
        return cls(layout, bits, k, n, group, buffers, spec.a_bits, spec.kv_bits if kv else 16, head_dim)

    # -- weights ----------------------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        """Weight codes [N, K] (int64) read back from the packed layout."""
        if self.layout == "wonly":
            return unpack_wonly(self._wonly())[0]
        if self.layout == "u8":
            return unpack_u8_weights(self.qweight, self.segments)
        return unpack_planes(self.qweight, self.segments)

    def dequantized(self) -> torch.Tensor:
        """fp32 W_hat = (codes - zero) * scale, the same arithmetic as the stage's fake quantization."""
        return dequantize_weight(self.codes(), self.scales, self.zeros.float(), self.group)

    def _wonly(self) -> WOnlyWeights:
        scales = self.scales16 if "scales16" in self._buffers else self.scales.half()
        group = self.group or self.in_features
        return WOnlyWeights(
            self.bits,
            self.out_features,
            self.in_features,
            group,
            self.qweight,
            getattr(self, "qweight_hi", None),
            scales.contiguous(),
            self.zeros.contiguous(),
        )

    def _lowbit(self) -> LowbitWeights:
        return LowbitWeights(
            self.layout, self.bits, self.out_features, self.in_features, self.qweight, self.terms, self.segments
        )

    def _kernel_weights(self):
        """The packed-weight record the kernels take, built once per device."""
        if self._kw is None or self._kw.data.device != self.qweight.device:
            self._kw = self._wonly() if self.layout == "wonly" else self._lowbit()
        return self._kw

    def to_kernel_form(self) -> PackedLinear:
        """Keep only what the kernels read (packed words with fp16 scales and uint8 zeros, or segment
        sums), dropping the fp32 scales (and the low-bit GEMMs' zeros) that the exact CPU reference
        needs: this is the memory a packed layer costs on the GPU."""
        self._kernel_weights()
        self._buffers.pop("scales", None)
        if self.layout == "wonly":
            self.register_buffer("scales16", self._kw.scales)
        else:
            self._buffers.pop("zeros", None)
        self._dense = None
        return self

    @property
    def nbytes(self) -> int:
        """Bytes the layer holds (packed words, scales, zeros, sums, bias)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    @property
    def kernel_nbytes(self) -> int:
        """Bytes the layer holds in kernel form (`to_kernel_form`)."""
        if "scales" not in self._buffers:  # in kernel form already
            return self.nbytes
        kept = sum(b.numel() * b.element_size() for n, b in self._buffers.items() if n not in ("scales", "zeros"))
        return kept + (
            2 * self.scales.numel() + self.zeros.numel() if self.layout == "wonly" else 0
        )  # fp16 scales, uint8 zeros

    @classmethod
    def concat(cls, parts: list[PackedLinear]) -> PackedLinear | None:
        """One weight-only linear computing the parts' outputs side by side (the parts read the
        same input: q|k|v, gate|up), or None when they differ in layout or quantization or one
        quantizes its output (KV). The parts' row buffers become views into the fused ones."""
        first = parts[0]
        same = all(
            p.layout == "wonly"
            and p.kv_bits >= 16
            and (p.bits, p.group, p.in_features, p.a_bits) == (first.bits, first.group, first.in_features, first.a_bits)
            and p._buffers.keys() == first._buffers.keys()
            for p in parts
        )
        bounds = [getattr(p, "act_bounds", None) for p in parts]
        if not same or not all(b is None or torch.equal(b, bounds[0]) for b in bounds):
            return None
        n = sum(p.out_features for p in parts)
        buffers = {
            name: (first._buffers[name] if name == "act_bounds" else torch.cat([p._buffers[name] for p in parts]))
            for name in first._buffers
        }
        fused_linear = cls(
            first.layout, first.bits, first.in_features, n, first.group, buffers, first.a_bits, 16, first.head_dim
        )
        start = 0
        for p in parts:
            for name in p._buffers:
                if name != "act_bounds":
                    p._buffers[name] = fused_linear._buffers[name][start : start + p.out_features]
            p._dense = p._kw = None
            start += p.out_features
        return fused_linear

    # -- forward ----------------------------------------------------------------------------------
    def input_quantization(self) -> tuple[int, tuple[int, ...]] | None:
        """(bits, channel cluster sizes) of the input quantization a caller may apply itself (fused
        into the op producing x, then forward(x, input_quantized=True)); None where there is none
        or where the kernel quantizes to integers itself (u8, planes)."""
        return (self.a_bits, self._in_sizes) if self.a_bits < 16 and self.layout == "wonly" else None

    def quantizes_per_token(self) -> bool:
        """Whether the input quantization is one range per token on weight-only weights: the GEMV
        then applies it itself, on the x it stages (kernels.w_only_gemm(a_bits=...))."""
        return self.input_quantization() is not None and len(self._in_sizes) == 1

    def quantizes_to_codes(self) -> bool:
        """Whether the GEMV, quantizing per token itself, keeps x as integer codes (kernels.ops.simt_mode:
        per-channel W2-W4): the Decoder's fused decode step runs on such GEMVs."""
        groups = -(-self.in_features // (self.group or self.in_features))
        return (
            self.quantizes_per_token()
            and kernels.ops.simt_mode(self.bits, groups, self.a_bits, True) == kernels.ops.SIMT_CODES
        )

    def kernel_path(self, m: int, a_bits: int | None = None, norm: bool = False) -> str:
        """The kernel the GPU forward runs for M rows (a_bits: x quantized per token in the weight-only
        GEMV; norm: the RMSNorm applied in it): the chooser's path (kernels.chooser.choose_path) as
        kernels.ops admits it (ops.w_only_impl, ops.lowbit_impl)."""
        w = self._kernel_weights()
        if self.layout == "wonly":
            return kernels.ops.w_only_impl(m, w, a_bits, norm=norm)
        return kernels.ops.lowbit_impl(m, w, self.a_bits)

    def forward(
        self,
        x: torch.Tensor,
        input_quantized: bool = False,
        norm: tuple[torch.Tensor, float] | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """y = Q(RMSNorm(x)) @ w_hat^T + bias + residual: `norm` (weight, eps) and `residual` (y's shape)
        are optional, and the weight-only GEMV applies them inside (kernels.w_only_gemm)."""
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        # fp32 activations on a layer that still holds the fp32 scales (not in kernel form) run the
        # stage's arithmetic on any device: the 16-bit kernels would round activations and scales
        exact = x.dtype == torch.float32 and "scales" in self._buffers
        kernel = x.is_cuda and kernels.cuda_runtime.cupy_available() and not exact
        fuse = kernel and self.layout == "wonly"  # the norm and the residual add go into the GEMV
        if residual is not None and self.kv_bits < 16:
            raise QtoolError("a residual add after a K/V projection with KV-cache quantization is not defined")
        if norm is not None and not fuse:
            x2 = reference.rms_norm(x2, norm[0].to(x2.dtype), norm[1])
        quantize = self.a_bits < 16 and not input_quantized
        # on the kernels, the u8 / bit-plane GEMMs quantize to integers and the weight-only GEMV per token
        in_kernel = kernel and (self.layout != "wonly" or self.quantizes_per_token())
        if (
            quantize and not in_kernel
        ):  # eager where exactness is the point: compiled, the division may round differently
            x2 = (fake_quant_clusters if exact else _quantize)(x2, self.a_bits, self._in_sizes)
        res2 = None if residual is None else residual.reshape(-1, self.out_features)
        if kernel:
            y = self._forward_kernel(
                x2, self.a_bits if quantize and in_kernel else None, norm if fuse else None, res2 if fuse else None
            )
        else:
            y = self._forward_reference(x2)
        if res2 is not None and not fuse:
            y = res2 + y
        y = y.reshape(*shape[:-1], self.out_features)
        if self.kv_bits < 16:
            if self._kv_quant is not None:
                y = self._kv_quant(y)
            else:
                y = fake_quant_per_token(y, self.kv_bits, width=self.head_dim)
        return y

    def _forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        if self._dense is None or self._dense.device != x.device:
            self._dense = self.dequantized().to(x.device)  # kept: the reference path trades memory for speed
        return nn.functional.linear(x, self._dense.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def _forward_kernel(self, x: torch.Tensor, a_bits: int | None = None, norm=None, residual=None) -> torch.Tensor:
        """The layer's kernel on 16-bit activations (a_bits: the weight-only GEMV quantizes x per token;
        norm, residual: see forward, weight-only only)."""
        dtype = x.dtype
        if dtype not in (torch.float16, torch.bfloat16):
            x = x.half()  # the kernels compute on 16-bit activations
            residual = None if residual is None else residual.half()
        w = self._kernel_weights()
        impl = self.kernel_path(x.shape[0], a_bits, norm is not None)
        if self.layout == "wonly":
            y = kernels.w_only_gemm(x, w, self.bias, impl=impl, a_bits=a_bits, norm=norm, residual=residual)
        else:
            y = kernels.lowbit_linear(x, w, self.a_bits, self.bias, impl=impl)
        return y.to(dtype)

    def extra_repr(self) -> str:
        a = f", a_bits={self.a_bits}" if self.a_bits < 16 else ""
        kv = f", kv_bits={self.kv_bits}" if self.kv_bits < 16 else ""
        shape = f"in={self.in_features}, out={self.out_features}"
        return f"{shape}, layout={self.layout}, bits={self.bits}, group={self.group}{a}{kv}"


_quantize = fused(fake_quant_clusters)
