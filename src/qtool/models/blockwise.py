"""Run a model one block at a time from captured block inputs.

Only one block lives on the compute device at a time, so a model larger than GPU memory can be
calibrated or trained. The inputs of block 0 (and the keyword arguments every block receives:
rotary embeddings, masks) are captured by running the model's embedding stage with a stand-in
first block that records its call and stops the forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from qtool.models.adapters import Adapter


class _Captured(Exception):
    pass


class _Catcher(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        # Not a submodule (it must not move with the model); kept for attributes that some
        # models read from layers[0], such as attention_type.
        object.__setattr__(self, "_block", block)
        self.args: tuple = ()
        self.kwargs: dict = {}

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)

    def forward(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs
        raise _Captured


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    return obj


@contextmanager
def outer_on(model: nn.Module, adapter: Adapter, device: torch.device, stand_in: nn.Module | None = None):
    """Move everything but the blocks (embeddings, final norm, head) to `device` for a while.

    The block list is swapped for `stand_in` (or an empty list) meanwhile, so the blocks stay home.
    """
    layers = adapter.layers(model)
    adapter.set_layers(model, nn.ModuleList([stand_in] if stand_in is not None else []))
    home = next(model.parameters()).device
    try:
        model.to(device)
        yield
    finally:
        model.to(home)
        adapter.set_layers(model, layers)


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, adapter: Adapter, input_ids: torch.Tensor, device: torch.device, store: torch.device | None = None
) -> tuple[torch.Tensor, dict]:
    """Hidden states entering block 0 for every row of input_ids [n, L], and the block kwargs.

    Rows are embedded one at a time, so the captured masks and position tensors have batch 1 and
    broadcast over any batch size later.
    """
    store = store or device
    catcher = _Catcher(adapter.layers(model)[0])
    hiddens, kwargs = [], {}
    with outer_on(model, adapter, device, stand_in=catcher):
        for row in input_ids:
            try:
                model(row[None].to(device), use_cache=False)
            except _Captured:
                pass
            hidden = catcher.args[0] if catcher.args else catcher.kwargs.pop("hidden_states")
            hiddens.append(hidden.to(store))
            if not kwargs:
                kwargs = {k: v for k, v in catcher.kwargs.items() if k != "hidden_states"}
    kwargs["use_cache"] = False
    kwargs.pop("past_key_values", None)
    kwargs.pop("past_key_value", None)
    return torch.cat(hiddens), {k: _to(v, device) for k, v in kwargs.items()}


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict, batch_size: int = 1) -> torch.Tensor:
    """Apply one block to hidden [n, L, d] in batches, on the device the block is on."""
    device = next(block.parameters()).device
    outs = []
    for start in range(0, hidden.shape[0], batch_size):
        out = block(hidden[start : start + batch_size].to(device), **kwargs)
        outs.append((out[0] if isinstance(out, tuple) else out).to(hidden.device))
    return torch.cat(outs)


def iterate_blocks(model: nn.Module, adapter: Adapter, device: torch.device) -> Iterator[tuple[int, nn.Module]]:
    """Yield (index, block) with the block moved to `device`, and move it home afterwards."""
    for index, block in enumerate(adapter.layers(model)):
        home = next(block.parameters()).device
        block.to(device)
        try:
            yield index, block
        finally:
            block.to(home)


@torch.no_grad()
def blockwise_logits(
    model: nn.Module,
    adapter: Adapter,
    input_ids: torch.Tensor,
    device: torch.device,
    on_block: Callable[[int, nn.Module, torch.Tensor], None] | None = None,
    batch_size: int = 1,
) -> torch.Tensor:
    """Logits of input_ids computed block by block (the reference for the whole-model forward)."""
    hidden, kwargs = capture_block_inputs(model, adapter, input_ids, device)
    for index, block in iterate_blocks(model, adapter, device):
        if on_block is not None:
            on_block(index, block, hidden)
        hidden = run_block(block, hidden, kwargs, batch_size)
    with outer_on(model, adapter, device):
        return adapter.head(model, hidden.to(device))
