"""Packers (torch, any device) for the kernel layouts, and their inverses for tests and references.

Layouts are described in kernels/cuda/README.md. Words are held in int32 tensors (bit patterns).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qtool.core.errors import QtoolError
from qtool.kernels.segments import Segments, make_segments

TILE_WORD_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]  # stored slot -> word, so lane tig reads words (tig, 4+tig) together
_INVERSE_ORDER = [TILE_WORD_ORDER.index(w) for w in range(8)]
WONLY_BITS = (2, 3, 4, 8)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding 32-bit patterns -> int32 with the same bits."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _as_u32(words: torch.Tensor) -> torch.Tensor:
    return words.to(torch.int64) & 0xFFFFFFFF


def check_codes(codes: torch.Tensor, bits: int, what: str) -> torch.Tensor:
    if codes.dim() != 2:
        raise QtoolError(f"{what} codes must be 2-D [rows, K], got shape {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise QtoolError(f"{what} codes must be an integer tensor, got {codes.dtype}: round and cast first")
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 2**bits):
        raise QtoolError(
            f"{what} codes must lie in [0, {2**bits - 1}] for {bits}-bit, got [{int(c.min())}, {int(c.max())}]"
        )
    return c


# ---- weight-only layout: interleaved pairs inside 32-bit words -------------------------------------


def pack_interleaved(codes: torch.Tensor, b: int, words_per_row: int) -> torch.Tensor:
    """C=32/b codes per word; pair j = codes (2j, 2j+1) at bits b*j and 16+b*j. Rows zero-padded."""
    n, k = codes.shape
    per = 32 // b
    c = torch.zeros(n, words_per_row * per, dtype=torch.int64, device=codes.device)
    c[:, :k] = codes
    c = c.view(n, words_per_row, per // 2, 2)
    shifts = torch.arange(per // 2, device=codes.device) * b
    words = ((c[..., 0] << shifts) | (c[..., 1] << (shifts + 16))).sum(-1)
    return _to_int32(words)


def unpack_interleaved(words: torch.Tensor, b: int, k: int) -> torch.Tensor:
    n, w = words.shape
    per = 32 // b
    shifts = torch.arange(per // 2, device=words.device) * b
    u = _as_u32(words).unsqueeze(-1)
    mask = (1 << b) - 1
    pairs = torch.stack([(u >> shifts) & mask, (u >> (shifts + 16)) & mask], dim=-1)
    return pairs.reshape(n, w * per)[:, :k]


@dataclass(frozen=True)
class WOnlyWeights:
    """Packed weights for W-only x A16: `data` [N, row_words] (+ `hi` [N, row_words/2] for W3),
    `scales` [N, G] fp16 and `zeros` [N, G] uint8: 3 bytes per group (the kernels build their
    fp16 scale | fp16(1024 + zero) << 16 word on load)."""

    bits: int
    n: int
    k: int
    group: int  # == k for per-channel
    data: torch.Tensor
    hi: torch.Tensor | None
    scales: torch.Tensor
    zeros: torch.Tensor

    @property
    def row_words(self) -> int:
        return self.data.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.hi, self.scales, self.zeros) if t is not None)


def _check_group(k: int, group: int | None, n_groups: int) -> int:
    g = k if group is None else int(group)
    if g <= 0 or -(-k // g) != n_groups:
        raise QtoolError(
            f"scales have {n_groups} groups but K={k} with group={group} needs {-(-k // max(g, 1))}: "
            "pass the group size used to quantize"
        )
    return g


def pack_wonly(codes, bits: int, scales, zeros, group: int | None) -> WOnlyWeights:
    """Pack [N, K] codes with per-row per-group fp scales and integer zeros for w_only_gemm."""
    if bits not in WONLY_BITS:
        raise QtoolError(f"weight-only kernels support {WONLY_BITS} bits, got {bits}: use 2, 3, 4 or 8")
    c = check_codes(codes, bits, "weight")
    n, k = c.shape
    scales = torch.as_tensor(scales).reshape(n, -1)
    zeros = torch.as_tensor(zeros).reshape(n, -1)
    g = _check_group(k, group, scales.shape[1])
    if k % 32:
        raise QtoolError(f"weight-only kernels need K % 32 == 0, got K={k}: zero-pad K (and x) to a multiple of 32")
    if g != k and (g & (g - 1) or g < 32):  # kernels index groups by k >> log2(group): a ragged last group is fine
        raise QtoolError(f"weight-only kernels need a power-of-two group >= 32 (or per-channel), got group={g}, K={k}")
    z = zeros.to(torch.float32)
    if z.numel() and (bool((z != z.round()).any()) or float(z.min()) < 0 or float(z.max()) > 2**bits - 1):
        raise QtoolError(f"zeros must be integers in [0, {2**bits - 1}]: round the zero points before packing")
    row_words = wonly_row_words(k, bits)
    if bits == 3:
        data, hi = pack_interleaved(c & 3, 2, row_words), pack_interleaved(c >> 2, 1, row_words // 2)
    else:
        data, hi = pack_interleaved(c, bits, row_words), None
    return WOnlyWeights(bits, n, k, g, data, hi, scales.to(torch.float16).contiguous(), z.to(torch.uint8).contiguous())


def wonly_row_words(k: int, bits: int) -> int:
    """Data words per row: whole mma-GEMV k-blocks (4 lanes x 16 B of data words), zero padded."""
    kblock = 16 * (16 if bits == 3 else 32 // bits)
    return -(-k // kblock) * 16


def unpack_wonly(w: WOnlyWeights) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes [N, K] int64, scales [N, G] fp32 as stored (fp16), zeros [N, G] fp32)."""
    if w.bits == 3:
        codes = unpack_interleaved(w.data, 2, w.k) | (unpack_interleaved(w.hi, 1, w.k) << 2)
    else:
        codes = unpack_interleaved(w.data, w.bits, w.k)
    return codes, w.scales.float(), w.zeros.float()


# ---- low-bit layouts: segment-padded K, bit-planes or u8 ----------------------------------------


def scatter_padded(codes: torch.Tensor, seg: Segments) -> torch.Tensor:
    """[R, K] codes -> [R, padded] with each segment starting on a tile boundary, zeros between."""
    if codes.shape[1] != seg.k:
        raise QtoolError(f"codes have K={codes.shape[1]} but the segments were made for K={seg.k}")
    out = torch.zeros(codes.shape[0], seg.padded, dtype=torch.int64, device=codes.device)
    out[:, seg.positions().to(codes.device)] = codes.to(torch.int64)
    return out


def gather_padded(padded: torch.Tensor, seg: Segments) -> torch.Tensor:
    return padded[:, seg.positions().to(padded.device)]


def pack_planes(codes: torch.Tensor, bits: int, seg: Segments) -> torch.Tensor:
    """int32 [bits, R, padded/32]: bit j of code k is bit k%32 of word k/32 of plane j (padded order),
    words of each 256-bit tile stored in TILE_WORD_ORDER."""
    p = scatter_padded(codes, seg)
    r = p.shape[0]
    lanes = torch.arange(32, device=p.device)
    planes = []
    for j in range(bits):
        bit = (p >> j) & 1
        words = (bit.view(r, -1, 32) << lanes).sum(-1)
        planes.append(words.view(r, -1, 8)[..., TILE_WORD_ORDER].reshape(r, -1))
    return _to_int32(torch.stack(planes))


def unpack_planes(planes: torch.Tensor, seg: Segments) -> torch.Tensor:
    """Inverse of pack_planes -> codes [R, K] int64."""
    bits, r, w = planes.shape
    words = _as_u32(planes).view(bits, r, -1, 8)[..., _INVERSE_ORDER].reshape(bits, r, w)
    lanes = torch.arange(32, device=planes.device)
    bitv = (words.unsqueeze(-1) >> lanes) & 1  # [bits, r, w, 32]
    weights = (1 << torch.arange(bits, device=planes.device)).view(bits, 1, 1, 1)
    return gather_padded((bitv * weights).sum(0).reshape(r, w * 32), seg)


def pack_u8_acts(codes: torch.Tensor, seg: Segments) -> torch.Tensor:
    """uint8 [M, padded]: codes in padded order, the 4-byte words of each 32-code tile in TILE_WORD_ORDER."""
    p = scatter_padded(codes, seg)
    m = p.shape[0]
    return p.view(m, -1, 8, 4)[:, :, TILE_WORD_ORDER].reshape(m, -1).to(torch.uint8)


def unpack_u8_acts(data: torch.Tensor, seg: Segments) -> torch.Tensor:
    m = data.shape[0]
    p = data.to(torch.int64).view(m, -1, 8, 4)[:, :, _INVERSE_ORDER].reshape(m, -1)
    return gather_padded(p, seg)


def pack_u8_weights(codes: torch.Tensor, seg: Segments) -> torch.Tensor:
    """int32 [N, ntiles, 4]: word tig, byte i = code(4*tig+i) | code(16+4*tig+i) << 4 within each tile."""
    p = scatter_padded(codes, seg)
    n = p.shape[0]
    t = p.view(n, -1, 2, 4, 4)  # [n, tile, half(k<16 / k>=16), tig, byte]
    nib = t[:, :, 0] | (t[:, :, 1] << 4)  # [n, tile, tig, byte]
    words = (nib << (torch.arange(4, device=p.device) * 8)).sum(-1)
    return _to_int32(words)


def unpack_u8_weights(words: torch.Tensor, seg: Segments) -> torch.Tensor:
    n = words.shape[0]
    b = (_as_u32(words).unsqueeze(-1) >> (torch.arange(4, device=words.device) * 8)) & 0xFF  # [n,t,tig,byte]
    halves = torch.stack([b & 0xF, b >> 4], dim=2)  # [n, t, half, tig, byte]
    return gather_padded(halves.reshape(n, -1), seg)


@dataclass(frozen=True)
class LowbitWeights:
    """Packed weights for the bit-plane ('planes') or u8 GEMM, with the per-segment epilogue terms
    `terms` [3, S, N] fp32: sw, sw*zw, sw*sum(qw) - sw*zw*Kseg."""

    layout: str
    bits: int
    n: int
    k: int
    data: torch.Tensor
    terms: torch.Tensor
    segments: Segments

    @property
    def nbytes(self) -> int:
        return self.data.numel() * 4 + self.terms.numel() * 4


def pack_lowbit(
    codes, bits: int, scales, zeros, group: int | None, clusters=None, layout: str = "planes"
) -> LowbitWeights:
    """Pack [N, K] weight codes for bitplane_gemm (layout 'planes', 1..8 bits) or u8_gemm ('u8', 1..4 bits).
    `clusters` are the activation cluster boundaries the layer will be run with (None = per token)."""
    max_bits = 8 if layout == "planes" else 4
    if not 1 <= bits <= max_bits:
        raise QtoolError(
            f"layout {layout!r} supports 1..{max_bits}-bit weights, got {bits}: use the 'planes' layout for more bits"
        )
    c = check_codes(codes, bits, "weight")
    n, k = c.shape
    scales = torch.as_tensor(scales).reshape(n, -1).to(torch.float32)
    zeros = torch.as_tensor(zeros).reshape(n, -1).to(torch.float32)
    _check_group(k, group, scales.shape[1])
    seg = make_segments(k, group, clusters, layout)
    data = pack_planes(c, bits, seg) if layout == "planes" else pack_u8_weights(c, seg)
    return LowbitWeights(layout, bits, n, k, data.contiguous(), weight_terms(c, scales, zeros, seg), seg)


def weight_terms(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, seg: Segments) -> torch.Tensor:
    dev = codes.device
    g = torch.tensor(seg.group_of, device=dev)
    b = torch.tensor(seg.bounds, device=dev)
    csum = torch.nn.functional.pad(codes.to(torch.float64).cumsum(1), (1, 0))
    sumw = csum[:, b[1:]] - csum[:, b[:-1]]  # [N, S]
    length = (b[1:] - b[:-1]).to(torch.float64)
    sw, zw = scales[:, g].to(torch.float64), zeros[:, g].to(torch.float64)
    terms = torch.stack([sw, sw * zw, sw * sumw - sw * zw * length])  # [3, N, S]
    return terms.transpose(1, 2).to(torch.float32).contiguous()


@dataclass(frozen=True)
class PackedActivations:
    """Quantized activations: `data` planes int32 [q, M, padded/32] or u8 [M, padded];
    `scale`, `zero` [M, C] fp32 (zero integer-valued); `seg_sum` [M, S] int32 code sums."""

    layout: str
    bits: int
    m: int
    dtype: torch.dtype
    data: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    seg_sum: torch.Tensor
    segments: Segments

    def codes(self) -> torch.Tensor:
        if self.layout == "planes":
            return unpack_planes(self.data, self.segments)
        return unpack_u8_acts(self.data, self.segments)
