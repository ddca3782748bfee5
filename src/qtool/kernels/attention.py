"""Decode attention over a static KV cache (kernels/cuda/decode_attention.cu) and its torch reference.

One new token per sequence: the step's fused q|k|v projection goes in; the rotary embedding, the
cache store and the attention over the cache's first pos + 1 positions run as one kernel, split over
the keys so short caches still fill the GPU. The position is read on the device, so a CUDA graph of
the step replays at any position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qtool.core.errors import QtoolError
from qtool.kernels import cuda_runtime as rt

THREADS = 128
HEAD_DIMS = (64, 128, 256)
MAX_GROUP = 8  # query heads per KV head held in registers


def max_chunk(head_dim: int) -> int:
    """Keys per block: its keys and values are copied into shared memory (32 KiB)."""
    return 64 if head_dim <= 128 else 32


def smem_bytes(group: int, head_dim: int, chunk: int) -> int:
    """The kernel's dynamic shared memory: keys + values (or the reduction over them), scores."""
    return max(4 * chunk * head_dim, 16 * group * head_dim) + 4 * group * chunk


def supported(heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the kernel takes this attention shape and dtype."""
    return (
        head_dim in HEAD_DIMS
        and heads % kv_heads == 0
        and heads // kv_heads <= MAX_GROUP
        and dtype in (torch.float16, torch.bfloat16)
    )


@dataclass
class AttentionWorkspace:
    """Per-split partials and the per-(sequence, KV head) counters the last block of a split-K
    launch combines through; the counters return to zero after every launch."""

    chunk: int
    splits: int
    partials: torch.Tensor  # [B, H, splits, D + 2] fp32
    counters: torch.Tensor  # [B * Hkv] int32


def workspace(batch: int, heads: int, kv_heads: int, head_dim: int, max_len: int, device) -> AttentionWorkspace:
    """Splits so that about two blocks per SM run (at most max_chunk keys each, at least 32)."""
    device = torch.device(device)
    sms = rt.device_attribute("cudaDevAttrMultiProcessorCount", device.index) if device.type == "cuda" else 1
    splits = min(-(-max_len // 32), max(1, -(-2 * sms // (batch * kv_heads))))
    splits = max(splits, -(-max_len // max_chunk(head_dim)))
    chunk = -(-max_len // splits)
    splits = -(-max_len // chunk)
    return AttentionWorkspace(
        chunk,
        splits,
        torch.empty(batch, heads, splits, head_dim + 2, dtype=torch.float32, device=device),
        torch.zeros(batch * kv_heads, dtype=torch.int32, device=device),
    )


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' rotary (x * cos + rotate_half(x) * sin) in fp32 (or x's wider dtype), rounded
    once to x's dtype."""
    wide = torch.promote_types(x.dtype, torch.float32)
    xf, half = x.to(wide), x.shape[-1] // 2
    rot = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos.to(wide) + rot * sin.to(wide)).to(x.dtype)


def decode_attention_ref(
    qkv, cos, sin, k_cache, v_cache, pos, heads: int, scale: float, compute=torch.float32
) -> torch.Tensor:
    """The kernel's function in torch: rotate q and k, store k and v at `pos` in the caches, attend
    over positions 0..pos in `compute` precision; returns [B, heads * D] in qkv's dtype."""
    b, kv_heads, _, d = k_cache.shape
    p = int(pos.reshape(-1)[0]) if torch.is_tensor(pos) else int(pos)
    q, k, v = qkv.reshape(b, heads + 2 * kv_heads, d).split([heads, kv_heads, kv_heads], dim=1)
    cos, sin = cos.reshape(1, 1, d), sin.reshape(1, 1, d)
    k_cache[:, :, p] = _rope(k, cos, sin)
    v_cache[:, :, p] = v
    qr = _rope(q, cos, sin).to(compute).view(b, kv_heads, heads // kv_heads, d)
    keys, values = k_cache[:, :, : p + 1].to(compute), v_cache[:, :, : p + 1].to(compute)
    probs = torch.softmax(torch.einsum("bhgd,bhjd->bhgj", qr, keys) * scale, dim=-1)
    return torch.einsum("bhgj,bhjd->bhgd", probs, values).reshape(b, heads * d).to(qkv.dtype)


def decode_attention(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos: torch.Tensor,
    heads: int,
    scale: float,
    ws: AttentionWorkspace | None = None,
) -> torch.Tensor:
    """Attention output [B, heads * D] of one new token per sequence. qkv [B, (H + 2 Hkv) * D] (the
    fused projection, rows may be strided), cos / sin [D] of position pos (the same for every
    sequence), caches [B, Hkv, L, D] (written at pos), pos: a one-element int64 tensor on the
    device. CPU / no CuPy: the torch reference."""
    b, kv_heads, max_len, d = k_cache.shape
    if not rt.on_gpu(qkv, k_cache):
        return decode_attention_ref(qkv, cos, sin, k_cache, v_cache, pos, heads, scale)
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and qkv.stride(-1) == 1 and pos.dtype == torch.int64):
        raise QtoolError("decode_attention takes contiguous caches, qkv rows with unit stride and an int64 position")
    ws = ws or workspace(b, heads, kv_heads, d, max_len, qkv.device)
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(b, heads * d, dtype=qkv.dtype, device=qkv.device)
    fn = rt.kernel("decode_attention.cu", f"decode_attention<{d}, {heads // kv_heads}, {rt.type_tag(qkv.dtype)}>")
    rt.launch(
        fn,
        (ws.splits, b * kv_heads),
        (THREADS,),
        (
            rt.ptr(qkv),
            rt.i32(qkv.stride(0)),
            rt.ptr(cos),
            rt.ptr(sin),
            rt.ptr(k_cache),
            rt.ptr(v_cache),
            rt.ptr(pos),
            rt.ptr(out),
            rt.ptr(ws.partials),
            rt.ptr(ws.counters),
            rt.i32(heads),
            rt.i32(kv_heads),
            rt.i32(max_len),
            rt.i32(ws.chunk),
            rt.i32(ws.splits),
            rt.f32(scale),
        ),
        shared_mem=smem_bytes(heads // kv_heads, d, ws.chunk),
    )
    return out
