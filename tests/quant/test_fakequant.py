"""Fake quantization: cluster-wise activation ranges (static and dynamic), the reorder stage a
-cluster spec needs, and learned scales taking the place of RTN's."""

from __future__ import annotations

import pytest
import torch
from blockwise_helpers import train_tiny

from conftest import tiny_model
from qtool.core.checkpoint import layer_key
from qtool.core.errors import QtoolError
from qtool.core.quantizer import dequantize_weight, fake_quant, minmax_qparams, quantize_weight
from qtool.core.spec import parse_spec
from qtool.models.adapters import adapter_for
from qtool.quant.fakequant import ActQuantizer, apply_spec


def test_one_cluster_static_equals_per_tensor_static():
    torch.manual_seed(0)
    x, lo, hi = torch.randn(3, 5, 40), -torch.rand(40) * 3, torch.rand(40) * 2
    scale, zero = minmax_qparams(lo.min(), hi.max(), 16, sym=False)
    expected = fake_quant(x, scale, zero, 16)
    assert torch.equal(ActQuantizer(4, torch.tensor([0, 40]), (lo, hi))(x), expected)
    # two clusters: each segment uses its own range
    two = ActQuantizer(4, torch.tensor([0, 10, 40]), (lo, hi))(x)
    s2, z2 = minmax_qparams(lo[10:].min(), hi[10:].max(), 16, sym=False)
    assert torch.equal(two[..., 10:], fake_quant(x[..., 10:], s2, z2, 16))


def test_cluster_dynamic_is_per_token_per_cluster():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12)
    out = ActQuantizer(3, torch.tensor([0, 4, 12]))(x)
    for a, b in ((0, 4), (4, 12)):
        seg = x[..., a:b]
        s, z = minmax_qparams(seg.amin(-1, keepdim=True), seg.amax(-1, keepdim=True), 8, sym=False)
        assert torch.equal(out[..., a:b], fake_quant(seg, s, z, 8))


def test_cluster_spec_needs_a_reorder_stage():
    model = tiny_model("llama")
    with pytest.raises(QtoolError, match="qtool reorder"):
        apply_spec(model, adapter_for(model.config), parse_spec("W4A16KV4-cluster"), {})
    assert parse_spec("W4A16KV4-cluster").name == "W4A16KV4-cluster"


def test_eval_quantizes_with_the_learned_scales(tmp_path):
    model = tiny_model("llama")
    qparams, _ = train_tiny(model, tmp_path, preset="efficientqat")
    adapter = adapter_for(model.config)
    spec = parse_spec("W3A16-g32")
    linear = adapter.linears(adapter.layers(model)[1])["mlp.down_proj"]
    scale, zero = qparams[layer_key(1, "mlp.down_proj", "scale")], qparams[layer_key(1, "mlp.down_proj", "zero")]
    codes, scale16, zero = quantize_weight(linear.weight.detach(), spec, scale, zero)
    assert torch.equal(scale16, scale.half().float())  # learned scales are used at fp16 precision
    expected = dequantize_weight(codes, scale16, zero, spec.group)
    apply_spec(model, adapter, spec, qparams=qparams)
    assert torch.equal(linear.weight.detach(), expected)
