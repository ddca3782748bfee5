"""GPTQ and compressed-tensors exports, read back by decoders written here from the loaders'
semantics (AutoGPTQ's QuantLinear for GPTQ, the compressed-tensors library for pack-quantized),
and by the compressed-tensors library itself where it is installed."""

from __future__ import annotations

import pytest
import torch
from transformers import GPTQConfig

from export_decoders import DECODE
from qtool.core.errors import QtoolError
from qtool.core.quantizer import dequantize_weight
from qtool.runtime.exports import (
    EXPORTS,
    check_exportable,
    compressed_config,
    compressed_linear,
    gptq_config,
    gptq_linear,
)

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
