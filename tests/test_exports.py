"""GPTQ and compressed-tensors exports, read back by decoders written here from the loaders'
semantics (AutoGPTQ's QuantLinear for GPTQ, the compressed-tensors library for pack-quantized),
and by the compressed-tensors library itself where it is installed."""

from __future__ import annotations

import pytest
import torch
from transformers import GPTQConfig

from qtool.errors import QtoolError
from qtool.packed.exports import (
    EXPORTS,
    check_exportable,
    compressed_config,
    compressed_linear,
    gptq_config,
    gptq_linear,
)
from qtool.quant.quantizer import dequantize_weight

N = 64
ALIGNED = [(bits, 256, group) for bits in (2, 3, 4, 8) for group in (32, 128, 0)]
RAGGED = [(bits, 576, 128) for bits in (2, 3, 4, 8)]  # 5 groups, the last 64 wide


def make(bits: int, k: int, group: int, sym: bool, zero_min: int = 0):
    """Random codes, fp32 scales (not fp16-exact) and zero points from a seeded generator."""
    gen = torch.Generator().manual_seed(bits * 1000 + k + group + sym)
    levels = 2**bits
    groups = -(-k // group) if group else 1
    codes = torch.randint(0, levels, (N, k), generator=gen).to(torch.uint8)
    scale = torch.rand(N, groups, generator=gen) * 0.02 + 1e-3
    if sym:
        zero = torch.full((N, groups), float(levels // 2))
    else:
        zero = torch.randint(zero_min, levels, (N, groups), generator=gen).float()
    return codes, scale, zero


def expected(codes, scale, zero, group):
    """qtool's dequantization with the scales rounded to fp16, the one change both formats make."""
    return dequantize_weight(codes, scale.half().float(), zero, group)


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
CASES = [("gptq", *c) for c in ALIGNED + RAGGED] + [("compressed-tensors", *c) for c in ALIGNED]


@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("fmt,bits,k,group", CASES)
def test_export_decodes_to_qtool_dequantization(fmt, bits, k, group, sym):
    codes, scale, zero = make(bits, k, group, sym, zero_min=1 if fmt == "gptq" else 0)
    tensors = EXPORTS[fmt].linear(codes, scale, zero, bits, group, sym)
    got = DECODE[fmt](tensors, bits, group, sym)
    assert torch.equal(got, expected(codes, scale, zero, group))
    # against fp32 scales the only difference is the fp16 rounding of each scale (2**-11 relative)
    exact = dequantize_weight(codes, scale, zero, group)
    assert bool(((got - exact).abs() <= exact.abs() * 2**-11).all())


def test_tensor_shapes_and_dtypes():
    codes, scale, zero = make(3, 576, 128, sym=False, zero_min=1)
    g = gptq_linear(codes, scale, zero, 3, 128, sym=False)
    assert {k: (tuple(v.shape), v.dtype) for k, v in g.items()} == {
        "qweight": ((576 * 3 // 32, N), torch.int32),
        "qzeros": ((5, N * 3 // 32), torch.int32),
        "scales": ((5, N), torch.float16),
        "g_idx": ((576,), torch.int32),
    }
    assert torch.equal(g["g_idx"], torch.arange(576, dtype=torch.int32) // 128)
    codes, scale, zero = make(3, 96, 32, sym=False)
    c = compressed_linear(codes[:40], scale[:40], zero[:40], 3, 32, sym=False)  # N=40: 120 bits of zero points
    assert {k: (tuple(v.shape), v.dtype) for k, v in c.items()} == {
        "weight_packed": ((40, 9), torch.int32),
        "weight_scale": ((40, 3), torch.float16),
        "weight_zero_point": ((4, 3), torch.int32),
        "weight_shape": ((2,), torch.int64),
    }
    assert c["weight_shape"].tolist() == [40, 96]
    assert "weight_zero_point" not in compressed_linear(*make(4, 96, 32, sym=True), 4, 32, sym=True)


def test_3bit_values_straddle_words_as_gptq_packs_them():
    """Values 10 and 21 of each 32 cross word boundaries and 31 ends the third word; words by hand."""
    for index, words in ((10, [-(2**30), 1, 0]), (21, [0, -(2**31), 0b11]), (31, [0, 0, -(2**29)])):
        codes = torch.zeros(32, 32, dtype=torch.uint8)
        codes[:, index] = 7
        scale, zero = torch.ones(32, 1), torch.full((32, 1), 4.0)
        assert gptq_linear(codes, scale, zero, 3, 0, sym=True)["qweight"][:, 0].tolist() == words
        assert compressed_linear(codes, scale, zero, 3, 0, sym=True)["weight_packed"][0].tolist() == words


def test_gptq_v1_zero_points_are_stored_minus_one():
    codes, scale, zero = make(4, 256, 128, sym=True)
    assert (gptq_linear(codes, scale, zero, 4, 128, sym=True)["qzeros"] == 0x77777777).all()


def test_configs_parse_in_transformers():
    cfg = GPTQConfig.from_dict(gptq_config(3, 0, sym=False))
    assert (cfg.bits, cfg.group_size, cfg.sym, cfg.desc_act, cfg.format) == (3, -1, False, False, "gptq")
    assert gptq_config(4, 128, sym=True)["checkpoint_format"] == "gptq"
    weights = compressed_config(4, 0, sym=True, ignore=["lm_head"])["config_groups"]["group_0"]["weights"]
    assert (weights["strategy"], weights["group_size"]) == ("channel", None)


@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("bits,k,group", ALIGNED)
def test_compressed_tensors_library_decompresses_the_export(bits, k, group, sym):
    pytest.importorskip("compressed_tensors", minversion="0.18")  # 0.18 made 3-bit packing dense
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from transformers import CompressedTensorsConfig

    cfg = compressed_config(bits, group, sym, ignore=["lm_head"])
    assert CompressedTensorsConfig.from_dict({"quantization_config": cfg}).quantization_config is not None
    parsed = QuantizationConfig.model_validate(cfg)
    compressor = BaseCompressor.load_from_registry(parsed.format)
    codes, scale, zero = make(bits, k, group, sym)
    tensors = compressed_linear(codes, scale, zero, bits, group, sym)
    out = compressor.decompress(tensors, parsed.config_groups["group_0"])
    # the library dequantizes in the scale dtype: one fp16 rounding of the exact product
    assert torch.equal(out["weight"], expected(codes, scale, zero, group).half())


# ---- clear errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "args,message",
    [
        ((5, 128, 256, 64, "gptq"), "2, 3, 4, 8-bit"),
        ((3, 128, 256, 64, "compressed-tensors", 5), "W2*"),
        ((3, 0, 48, 64, "gptq"), "in_features must be a multiple of 32"),
        ((4, 0, 64, 20, "gptq"), "out_features must be a multiple of 8"),
        ((4, 128, 576, 64, "compressed-tensors"), "ragged last group"),
        ((4, 128, 256, 64, "awq"), "unknown export format"),
    ],
)
def test_check_exportable_refuses_clearly(args, message):
    with pytest.raises(QtoolError, match=message.replace("*", r"\*")) as err:
        check_exportable(*args)
    assert "\n" not in str(err.value) and ": " in str(err.value)


def test_gptq_refuses_a_zero_point_of_zero():
    codes, scale, zero = make(2, 256, 32, sym=False, zero_min=1)
    zero[3, 1] = 0
    with pytest.raises(QtoolError, match="zero point of 0"):
        gptq_linear(codes, scale, zero, 2, 32, sym=False)
    compressed_linear(codes, scale, zero, 2, 32, sym=False)  # compressed-tensors stores it as is


@pytest.mark.parametrize("fmt", list(EXPORTS))
def test_linears_refuse_inconsistent_inputs(fmt):
    linear = EXPORTS[fmt].linear
    codes, scale, zero = make(4, 256, 128, sym=False, zero_min=1)
    with pytest.raises(QtoolError, match="zero point = 8"):
        linear(codes, scale, zero, 4, 128, True)
    with pytest.raises(QtoolError, match=r"\[N, G\] = \[64, 2\]"):
        linear(codes, scale[:, :1], zero, 4, 128, False)
    with pytest.raises(QtoolError, match="must lie in"):
        linear(codes, scale, zero, 2, 128, False)
    with pytest.raises(QtoolError, match="integers in"):
        linear(codes, scale, zero + 0.5, 4, 128, False)
    if fmt == "compressed-tensors":
        with pytest.raises(QtoolError, match="ragged"):
            linear(*make(4, 576, 128, sym=False), 4, 128, False)
