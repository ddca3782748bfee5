"""CPU: the packers round-trip (weight-only words, bit-planes, u8), the word layout by hand, and bad input."""

import pytest
import torch
from kernel_weights import random_weights

from qtool.core.errors import QtoolError
from qtool.kernels import pack_lowbit, pack_wonly
from qtool.kernels.layouts import (
    pack_interleaved,
    unpack_interleaved,
    unpack_planes,
    unpack_u8_weights,
    unpack_wonly,
)


def test_interleaved_word_layout_by_hand():
    codes = torch.tensor([[1, 2, 3, 0, 0, 0, 0, 1]])  # 4-bit: pair j = codes (2j, 2j+1) at bits 4j, 16+4j
    word = pack_interleaved(codes, 4, 1)
    assert int(word) & 0xFFFFFFFF == 1 | (2 << 16) | (3 << 4) | (1 << 28)
    assert torch.equal(unpack_interleaved(word, 4, 8), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 64, 128, None])
@pytest.mark.parametrize("k", [384, 352])  # 352: a ragged last group for 64 and 128
def test_wonly_pack_roundtrip(bits, group, k):
    codes, scales, zeros = random_weights(5, k, bits, group)
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
    codes, scales, zeros = random_weights(9, 300, bits, 64)
    w = pack_lowbit(codes, bits, scales, zeros, 64, [0, 37, 300], layout)
    back = unpack_planes(w.data, w.segments) if layout == "planes" else unpack_u8_weights(w.data, w.segments)
    assert torch.equal(back, codes)


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
    codes, scales, zeros = random_weights(3, k, min(bits, 8), group)
    with pytest.raises(QtoolError, match=match):
        pack_wonly(codes % 16, bits, scales, zeros, group)


def test_lowbit_rejects_bad_input():
    codes, scales, zeros = random_weights(3, 64, 4, None)
    with pytest.raises(QtoolError, match="1..4-bit"):
        pack_lowbit(codes, 5, scales, zeros, None, None, "u8")
    with pytest.raises(QtoolError, match="cluster boundaries"):
        pack_lowbit(codes, 4, scales, zeros, None, [0, 40, 30, 64], "planes")
    with pytest.raises(QtoolError, match=r"\[0, 3\]"):
        pack_lowbit(codes, 2, scales, zeros, None, None, "planes")
