"""Exports of weight-only integer linears (2, 3, 4 or 8 bits) to the GPTQ and compressed-tensors
checkpoint formats, so that transformers, vLLM and GPTQModel load qtool's quantized models.

Input per linear is qtool's representation (qtool.core.quantizer): codes [N, K] in
[0, 2^bits - 1], fp32 scale [N, G] and integer-valued fp32 zero [N, G], G = ceil(K / group)
(group 0: one group per row). Both formats keep the codes and zero points exactly and store the
scales as fp16, the values qtool's weight scales hold (core.quantizer.fp16_scale), so an exported
weight equals qtool's dequantization.

Both formats pack values as one little-endian bit stream per packed row: value i holds bits
i*bits .. i*bits + bits - 1, so 3-bit values straddle 32-bit words (word 0: values 0-9 and the low
2 bits of value 10; word 1: its high bit, values 11-20, the low bit of 21; ...). That is GPTQ's
3-bit layout, and compressed-tensors' from 0.18 on (0.17 and earlier put 10 values in a word and
left 2 bits unused; 2, 4 and 8 bits are the same in every version).
"""

from __future__ import annotations

from collections.abc import Callable
from math import gcd
from typing import NamedTuple

import torch

from qtool.core.errors import QtoolError
from qtool.kernels.layouts import check_codes

BITS = (2, 3, 4, 8)
CT_VERSION = "0.20.0"  # the compressed-tensors release whose layout and config this follows


def check_exportable(bits: int, group: int, k: int, n: int, fmt: str, levels: int | None = None) -> None:
    """Refuse, before anything is written, a [N=n, K=k] linear that `fmt` cannot hold. `levels`
    (default 2**bits) catches W2*'s 5 levels, which neither format can name."""
    if fmt not in EXPORTS:
        raise QtoolError(f"unknown export format '{fmt}': choose one of {', '.join(EXPORTS)}")
    if levels is not None and levels != 2**bits:
        raise QtoolError(
            f"{fmt} has no {levels}-level weight type (W2* bit balance): "
            "export a W2 or W3 spec, or keep qtool's own format"
        )
    if bits not in BITS:
        raise QtoolError(
            f"{fmt} export takes {', '.join(map(str, BITS))}-bit weights, got {bits}-bit: quantize to one of those"
        )
    if fmt == "gptq":
        multiple = 32 // gcd(32, bits)
        for name, size in (("in_features", k), ("out_features", n)):
            if size % multiple:
                raise QtoolError(
                    f"GPTQ packs {bits}-bit values into whole int32 words, so {name} must be a multiple of {multiple}, "
                    f"got {size}: leave this layer unquantized or use the compressed-tensors export"
                )
    elif group and k % group:
        raise QtoolError(
            f"compressed-tensors groups must divide in_features, got K={k} with group {group} (ragged last group): "
            "pick a group that divides K, or use the GPTQ export"
        )


def gptq_linear(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int, sym: bool
) -> dict[str, torch.Tensor]:
    """One linear's GPTQ tensors: qweight int32 [K*bits/32, N] (packed along K), qzeros int32
    [G, N*bits/32] (packed along N), scales fp16 [G, N], g_idx int32 [K] = k // group. g_idx also
    describes a ragged last group, which GPTQModel's torch and triton kernels read and vLLM refuses.
    The bias is the caller's.

    Zero points are written in the v1 format ("checkpoint_format": "gptq", read by default by
    transformers, optimum, GPTQModel and vLLM) as zero - 1. vLLM's and exllama's kernels and
    AutoGPTQ's triton kernels add the 1 back without masking, so a zero point of 0 would come back
    as 2**bits: it is refused."""
    q = check_codes(codes, bits, "gptq")
    n, k = q.shape
    check_exportable(bits, group, k, n, "gptq")
    z = _zeros(q, scale, zero, bits, group, sym, "gptq")
    if bool((z == 0).any()):
        raise QtoolError(
            f"GPTQ v1 stores zero-1 and loaders read it back as {2**bits} for a zero point of 0, which "
            f"{int((z == 0).sum())} groups have: use the compressed-tensors export or a symmetric spec (-sym)"
        )
    return {
        "qweight": _pack(q, bits).T.contiguous(),
        "qzeros": _pack((z - 1).T, bits),
        "scales": _fp16(scale).T.contiguous(),
        "g_idx": (torch.arange(k, device=codes.device) // (group or k)).to(torch.int32),
    }


def gptq_config(bits: int, group: int, sym: bool) -> dict:
    """quantization_config (and quantize_config.json) for gptq_linear's tensors: the fields
    transformers' GPTQConfig, GPTQModel and vLLM read, with AutoGPTQ's defaults for the rest."""
    return {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group or -1,
        "desc_act": False,
        "sym": sym,
        "static_groups": False,
        "true_sequential": True,
        "damp_percent": 0.01,
        "lm_head": False,
        "format": "gptq",  # transformers >= 5 and GPTQModel
        "checkpoint_format": "gptq",  # the older name, which vLLM reads
    }


def compressed_linear(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int, sym: bool
) -> dict[str, torch.Tensor]:
    """One linear's compressed-tensors "pack-quantized" tensors: weight_packed int32
    [N, ceil(K*bits/32)] (packed along K), weight_scale fp16 [N, G] (loaders cast it to the model
    dtype), weight_shape int64 (N, K) and, when asymmetric, weight_zero_point int32
    [ceil(N*bits/32), G] (packed along N).

    The library holds codes and zero points as signed ints (code - 2**(bits-1)) and adds
    2**(bits-1) back when packing, so the packed words hold qtool's unsigned codes and zero points
    as they are. Symmetric means a zero point of 2**(bits-1), which is then not stored."""
    q = check_codes(codes, bits, "compressed-tensors")
    n, k = q.shape
    check_exportable(bits, group, k, n, "compressed-tensors")
    z = _zeros(q, scale, zero, bits, group, sym, "compressed-tensors")
    out = {
        "weight_packed": _pack(q, bits),
        "weight_scale": _fp16(scale).contiguous(),
        "weight_shape": torch.tensor([n, k], dtype=torch.int64),
    }
    if not sym:
        out["weight_zero_point"] = _pack(z.T, bits).T.contiguous()
    return out


def compressed_config(bits: int, group: int, sym: bool, ignore: list[str]) -> dict:
    """quantization_config for compressed_linear's tensors, with the keys the library's
    ModelCompressor writes; `ignore` names the linears left in float (e.g. lm_head)."""
    weights = {
        "num_bits": bits,
        "type": "int",
        "symmetric": sym,
        "group_size": group or None,
        "strategy": "group" if group else "channel",
        "dynamic": False,
    }
    return {
        "version": CT_VERSION,
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
            }
        },
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }


class Export(NamedTuple):
    linear: Callable[..., dict[str, torch.Tensor]]  # (codes, scale, zero, bits, group, sym)
    config: Callable[..., dict]


EXPORTS = {
    "gptq": Export(gptq_linear, gptq_config),
    "compressed-tensors": Export(compressed_linear, compressed_config),
}


def _zeros(q, scale, zero, bits, group, sym, fmt) -> torch.Tensor:
    """The zero points as int64, after checking both shapes against the codes q, their range
    and, for sym, their value."""
    n, k = q.shape
    shape = (n, -(-k // group) if group else 1)
    if tuple(scale.shape) != shape or tuple(zero.shape) != shape:
        raise QtoolError(
            f"scale and zero must be [N, G] = {list(shape)} for K={k}, group {group}, "
            f"got {list(scale.shape)} and {list(zero.shape)}"
        )
    z = zero.round().to(torch.int64)
    if not torch.equal(z.to(zero.dtype), zero) or int(z.min()) < 0 or int(z.max()) >= 2**bits:
        raise QtoolError(
            f"{fmt} zero points must be integers in [0, {2**bits - 1}] for {bits}-bit: round and clamp them first"
        )
    if sym and not bool((z == 2 ** (bits - 1)).all()):
        raise QtoolError(
            f"symmetric {bits}-bit export needs every zero point = {2 ** (bits - 1)}: export with sym=False"
        )
    return z


def _fp16(scale: torch.Tensor) -> torch.Tensor:
    s = scale.to(torch.float16)
    if not bool(torch.isfinite(s).all()):
        raise QtoolError("scales overflow float16, in which both formats store them: leave this layer unquantized")
    return s


def _pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """int [rows, cols] in [0, 2**bits) -> int32 [rows, ceil(cols*bits/32)]: each row one
    little-endian bit stream, value i at bit i*bits; a value crossing a word boundary puts its low
    bits at the top of one word and the rest at the bottom of the next."""
    rows, cols = values.shape
    words = -(-cols * bits // 32)
    start = torch.arange(cols, device=values.device) * bits
    shifted = values.to(torch.int64) << (start % 32)
    out = torch.zeros(rows, words + 1, dtype=torch.int64, device=values.device)
    out.index_add_(1, start // 32, shifted & 0xFFFFFFFF)  # fields are disjoint: adding is OR
    out.index_add_(1, start // 32 + 1, shifted >> 32)
    out = out[:, :words]
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def export_tensors(model, adapter, spec, qparams, fmt: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(every tensor of the exported checkpoint, its quantization_config) for a weight-only spec:
    block linears in `fmt`, everything else as the model holds it (a tied head once)."""
    from qtool.runtime.packed_model import quantized_linears

    if spec.quantizes_activations or spec.quantizes_kv:
        raise QtoolError(
            f"{fmt} exports are weight-only, {spec.name} quantizes activations or the KV cache: use --format qtool"
        )
    bits, group = spec.w_storage_bits, spec.group
    check_exportable(bits, 0, 32, 32, fmt, levels=spec.w_levels)  # shapes are checked per linear
    tensors = dict(model.state_dict())
    if getattr(model.config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    for index, name, _linear, codes, scale, zero in quantized_linears(model, adapter, spec, qparams):
        prefix = f"{adapter.layers_path}.{index}.{name}"
        del tensors[f"{prefix}.weight"]
        for key, value in EXPORTS[fmt].linear(codes, scale, zero, bits, group, spec.w_sym).items():
            tensors[f"{prefix}.{key}"] = value
    config = (
        gptq_config(bits, group, spec.w_sym)
        if fmt == "gptq"
        else compressed_config(bits, group, spec.w_sym, ["lm_head"])
    )
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, config
