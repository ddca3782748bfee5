"""Memory accounting: every parameter counted, explicit numbers for SmolLM2, and the KV cache of a
configuration alone."""

import pytest

from conftest import FAMILIES, tiny_model
from qtool.core.spec import parse_spec
from qtool.metrics.memory import memory_report
from qtool.models.adapters import adapter_for
from qtool.models.loading import load_model


@pytest.mark.parametrize("family", FAMILIES)
def test_memory_accounting_counts_every_parameter(family):
    model = tiny_model(family)
    adapter = adapter_for(model.config)
    report = memory_report(model.config, adapter, parse_spec("W16A16"))
    unique = sum(p.numel() for p in model.parameters())  # tied weights are listed once
    assert report.linear_params + report.other_params == unique
    assert report.weight_bytes == 2 * unique


def test_memory_accounting_explicit_numbers(smollm2_dir):
    config = load_model(smollm2_dir).config
    adapter = adapter_for(config)
    # 30 blocks x (576*576*2 + 192*576*2 + 1536*576*3) linear weights
    linear = 30 * (576 * 576 * 2 + 192 * 576 * 2 + 1536 * 576 * 3)
    report = memory_report(config, adapter, parse_spec("W4A16KV4-g64"), batch=2, seqlen=1024)
    groups = 30 * (576 * 9 * 2 + 192 * 9 * 2 + 1536 * 9 * 2 + 576 * 24)
    assert report.linear_params == linear
    assert report.weight_bits_per_param == pytest.approx((linear * 4 + groups * (16 + 4)) / linear)
    kv_values = 2 * 30 * 2 * 1024 * 3 * 64
    assert report.kv_bytes == kv_values * 4 // 8 + (kv_values // 64) * 4


def test_memory_from_config_alone():
    from pathlib import Path

    from qtool.metrics.memory import config_memory

    config = Path(__file__).resolve().parents[2] / "configs/llama-2-70b.json"
    rows = {
        r["spec"]: r for r in config_memory(str(config), ["W16A16", "W4A16", "W4A16KV4", "W4A16KV4-cluster"], 64, 8192)
    }
    kv16 = 2 * 80 * 64 * 8192 * 8 * 128 * 2  # K and V, layers, batch, tokens, KV heads, head dim, bytes
    assert rows["W16A16"]["kv_bytes"] == rows["W4A16"]["kv_bytes"] == kv16
    assert rows["W4A16KV4-cluster"]["kv_bytes"] == kv16 // 4  # static cluster scales are per layer
    assert rows["W4A16KV4"]["kv_bytes"] == kv16 // 4 + kv16 // 2 // 128 * 4  # fp16 scale and zero per token and head
    assert 4 < rows["W4A16"]["weight_bits_per_param"] < 4.1 and rows["W4A16"]["linear_params"] > 6.4e10
