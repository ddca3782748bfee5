"""Block-by-block execution equals the whole-model forward, for every family and for SmolLM2."""

import pytest
import torch

from conftest import FAMILIES, tiny_model
from qtool.core.errors import QtoolError
from qtool.core.spec import parse_spec
from qtool.metrics.memory import linear_shapes, memory_report
from qtool.models.adapters import adapter_for
from qtool.models.blockwise import blockwise_logits
from qtool.models.loading import load_model


@pytest.mark.parametrize("family", FAMILIES)
def test_blockwise_equals_whole_model_float64(family):
    model = tiny_model(family).double()
    ids = torch.randint(0, model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(ids).logits
    got = blockwise_logits(model, adapter_for(model.config), ids, torch.device("cpu"), batch_size=2)
    assert torch.allclose(got, reference, rtol=0, atol=1e-12)


def test_blockwise_equals_whole_model_smollm2(smollm2_dir):
    model = load_model(smollm2_dir)
    ids = torch.randint(0, 49152, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model(ids).logits
    got = blockwise_logits(model, adapter_for(model.config), ids, torch.device("cpu"))
    assert torch.allclose(got, reference, rtol=0, atol=1e-4)
    assert (got - reference).abs().max() < 1e-4 * reference.abs().max()


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_names_every_linear_with_its_shape(family):
    model = tiny_model(family)
    adapter = adapter_for(model.config)
    block = adapter.layers(model)[0]
    shapes = [tuple(lin.weight.shape) for lin in adapter.linears(block).values()]
    assert shapes == linear_shapes(model.config, adapter)
    # every nn.Linear of the block is named exactly once
    all_linears = {id(m) for m in block.modules() if isinstance(m, torch.nn.Linear)}
    assert all_linears == {id(m) for m in adapter.linears(block).values()}


@pytest.mark.parametrize("family", FAMILIES)
def test_fold_pairs_connect_matching_channels(family):
    model = tiny_model(family)
    adapter = adapter_for(model.config)
    block = adapter.layers(model)[0]
    heads, kv, head_dim = adapter.attention_shape(model.config)
    for pair in adapter.fold_pairs(model.config):
        producer = block.get_submodule(pair.producer)
        width = producer.weight.shape[0]
        for name in pair.consumers:
            consumer_in = block.get_submodule(name).weight.shape[1]
            assert consumer_in == (width * heads // kv if pair.grouped else width), pair


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


def test_unsupported_architecture_is_a_clear_error():
    from transformers import GPT2Config

    with pytest.raises(QtoolError, match="supported: llama, mistral, opt, qwen2"):
        adapter_for(GPT2Config())
