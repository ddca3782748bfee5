"""Independent readers of the GPTQ and compressed-tensors exports, written from the loaders' semantics
(tests/runtime/test_exports.py, tests/stages/test_pack.py)."""

from __future__ import annotations

import torch

# ---- independent GPTQ reader: AutoGPTQ's QuantLinear, shifts and masks written out ----------------


def gptq_unpack(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] packed down the rows -> [R * 32 / bits, C]."""
    u = words.to(torch.int64) & 0xFFFFFFFF
    if bits != 3:
        shifts = torch.arange(0, 32, bits)  # value j of a word sits at bit j * bits
        return ((u[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)).reshape(-1, u.shape[1])
    w0, w1, w2 = u.reshape(-1, 3, u.shape[1]).unbind(1)  # 32 values in 3 words
    vals = [(w0 >> (3 * j)) & 7 for j in range(10)]
    vals.append(((w0 >> 30) & 0b11) | ((w1 & 0b1) << 2))  # value 10 straddles words 0 and 1
    vals += [(w1 >> (1 + 3 * j)) & 7 for j in range(10)]
    vals.append(((w1 >> 31) & 0b1) | ((w2 & 0b11) << 1))  # value 21 straddles words 1 and 2
    vals += [(w2 >> (2 + 3 * j)) & 7 for j in range(10)]
    return torch.stack(vals, 1).reshape(-1, u.shape[1])


def gptq_decode(t: dict, bits: int, group: int, sym: bool) -> torch.Tensor:
    q = gptq_unpack(t["qweight"], bits)  # [K, N]
    z = gptq_unpack(t["qzeros"].T, bits).T + 1  # v1 stores zero - 1; loaders add 1 back, unmasked
    g = t["g_idx"].long()
    return ((q - z[g]) * t["scales"].float()[g]).T


# ---- independent compressed-tensors reader: the library's pack_to_int32 semantics ------------------


def ct_unpack(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """int32 [R, W] -> [R, count]: value i at bit i * bits of each row's bit stream, unsigned."""
    u = words.to(torch.int64) & 0xFFFFFFFF
    u = torch.cat([u, torch.zeros_like(u[:, :1])], dim=1)
    start = torch.arange(count) * bits
    word, offset = start // 32, start % 32
    low = u[:, word] >> offset
    spill = u[:, word + 1] << (32 - offset)  # the high bits of a value that crossed into the next word
    return (low | spill) & ((1 << bits) - 1)


def ct_decode(t: dict, bits: int, group: int, sym: bool) -> torch.Tensor:
    n, k = t["weight_shape"].tolist()
    offset = 1 << (bits - 1)  # the library's signed ints are the packed values minus this
    q = ct_unpack(t["weight_packed"], bits, k) - offset
    zp = 0 if sym else ct_unpack(t["weight_zero_point"].T, bits, n).T[:, :, None] - offset
    s = t["weight_scale"].float()
    return ((q.reshape(n, s.shape[1], -1) - zp) * s[:, :, None]).reshape(n, k)


DECODE = {"gptq": gptq_decode, "compressed-tensors": ct_decode}
