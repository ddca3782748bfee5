"""Helpers shared by the block-wise training tests: a block of a tiny model with its captured inputs,
a block's output under given parameters, and a short training run with a journal."""

from __future__ import annotations

import torch
from torch.func import functional_call

from conftest import tiny_model
from qtool.core.checkpoint import BlockJournal
from qtool.core.spec import parse_spec
from qtool.models.adapters import adapter_for
from qtool.models.blockwise import capture_block_inputs
from qtool.quant.blockwise_train import PRESETS, TrainSettings, train_blocks


def block_and_inputs(family):
    model = tiny_model(family).double()
    adapter = adapter_for(model.config)
    hidden, kwargs = capture_block_inputs(model, adapter, torch.randint(0, 256, (2, 16)), torch.device("cpu"))
    return model, adapter, adapter.layers(model)[1], hidden, kwargs


def block_output(block, params, hidden, kwargs):
    out = functional_call(block, params, (hidden,), kwargs)
    return out[0] if isinstance(out, tuple) else out


def train_tiny(model, journal_dir, preset="omniquant"):
    adapter = adapter_for(model.config)
    settings = TrainSettings(epochs=2, batch=2, seed=0, lr=dict(PRESETS[preset].lr), cosine=True)
    journal = BlockJournal(journal_dir / "out", "fp")
    windows = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    return train_blocks(
        model, adapter, parse_spec("W3A8-g32"), PRESETS[preset], settings, windows, torch.device("cpu"), journal
    )
