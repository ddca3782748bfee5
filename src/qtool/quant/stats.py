"""Per-channel activation statistics of a block's linears (calibrate's output, and the LET
initialisation of block-wise training). In a distributed run each rank sees its share of the
windows and the statistics are reduced over the ranks (MIN of the minima, MAX of the maxima and
absmaxima), so every rank holds those of all the windows, exactly as one process computes them."""

from __future__ import annotations

import torch

from qtool.core import distributed
from qtool.core.checkpoint import layer_key
from qtool.models.blockwise import run_block


class _ChannelStats:
    """Running per-channel min/max/absmax over every token seen."""

    def __init__(self):
        self.values: dict[str, torch.Tensor] = {}

    def update(self, key: str, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        new = {"min": flat.amin(0), "max": flat.amax(0), "absmax": flat.abs().amax(0)}
        for kind, value in new.items():
            name = f"{key}.{kind}"
            old = self.values.get(name)
            if old is None:
                self.values[name] = value
            elif kind == "min":
                self.values[name] = torch.minimum(old, value)
            else:
                self.values[name] = torch.maximum(old, value)


def block_stats(block, adapter, index: int, hidden, kwargs, batch_size: int) -> tuple[dict, torch.Tensor]:
    """Statistics of one block's linears while it maps hidden -> output."""
    stats = _ChannelStats()
    handles = []
    for name, linear in adapter.linears(block).items():
        handles.append(
            linear.register_forward_pre_hook(lambda m, a, n=name: stats.update(layer_key(index, n, "input"), a[0]))
        )
        if name in (adapter.q, adapter.k, adapter.v):
            handles.append(
                linear.register_forward_hook(lambda m, a, o, n=name: stats.update(layer_key(index, n, "output"), o))
            )
    try:
        out = run_block(block, hidden, kwargs, batch_size)
    finally:
        for h in handles:
            h.remove()
    # on several ranks each saw its share of the windows: reduce to the statistics of all of them
    ops = {k: "min" if k.endswith(".min") else "max" for k in stats.values}
    return {k: v.cpu() for k, v in distributed.all_reduce_stats(stats.values, ops).items()}, out
