"""Adapters: every linear named with its shape, fold pairs that connect matching channels, and a clear
error for an unsupported architecture."""

import pytest
import torch

from conftest import FAMILIES, tiny_model
from qtool.core.errors import QtoolError
from qtool.metrics.memory import linear_shapes
from qtool.models.adapters import adapter_for


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


def test_unsupported_architecture_is_a_clear_error():
    from transformers import GPT2Config

    with pytest.raises(QtoolError, match="supported: llama, mistral, opt, qwen2"):
        adapter_for(GPT2Config())
