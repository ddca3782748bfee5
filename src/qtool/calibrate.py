"""`qtool calibrate`: per-channel activation statistics from calibration text.

For every linear of every block: min, max and absmax of each input channel; for the query, key
and value projections also of each output channel. Reorder (RPTQ), LET initialisation
(OmniQuant) and static activation ranges all read these.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from qtool.checkpoint import BlockJournal, StageWriter, TextStageParams
from qtool.models.adapters import adapter_for
from qtool.models.blockwise import capture_block_inputs, iterate_blocks, run_block
from qtool.quant.fakequant import stat_prefix
from qtool.runtime import (
    console,
    fingerprint_or_skip,
    load,
    open_source,
    pick_device,
    progress,
    training_windows,
)


@dataclass(frozen=True)
class CalibrateParams(TextStageParams):
    """Calibration needs only its text windows."""


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
        handles.append(linear.register_forward_pre_hook(lambda m, a, n=name: stats.update(stat_prefix(index, n, "input"), a[0])))
        if name in (adapter.q, adapter.k, adapter.v):
            handles.append(linear.register_forward_hook(lambda m, a, o, n=name: stats.update(stat_prefix(index, n, "output"), o)))
    try:
        out = run_block(block, hidden, kwargs, batch_size)
    finally:
        for h in handles:
            h.remove()
    return {k: v.cpu() for k, v in stats.values.items()}, out


@torch.no_grad()
def calibrate(params: CalibrateParams, device: str = "auto", batch_size: int = 1) -> dict:
    """Run the stage (or find it already complete) and return its summary."""
    source = open_source(params.model)
    out = Path(params.out)
    fingerprint, skipped = fingerprint_or_skip("calibrate", params, source)
    if skipped:
        return skipped
    dev = pick_device(device)
    t0 = time.time()
    model, tokenizer = load(source)
    adapter = adapter_for(model.config)
    windows = training_windows(tokenizer, params)
    hidden, kwargs = capture_block_inputs(model, adapter, windows, dev)
    journal = BlockJournal(out, fingerprint)
    stats: dict[str, torch.Tensor] = {}
    n_blocks = len(adapter.layers(model))
    with progress() as bar, StageWriter(out, "calibrate", params.fingerprint_params(), source) as writer:
        task = bar.add_task("calibrate", total=n_blocks, info="")
        for index, block in iterate_blocks(model, adapter, dev):
            done = journal.load(index)
            if done is None:
                done, hidden = block_stats(block, adapter, index, hidden, kwargs, batch_size)
                journal.save(index, done)
            else:
                hidden = run_block(block, hidden, kwargs, batch_size)
            stats.update(done)
            bar.update(task, advance=1, info=f"block {index + 1}/{n_blocks}")
        writer.save_tensors("calibrate", stats)
        writer.timings["calibrate_s"] = round(time.time() - t0, 3)
        writer.metrics.update(tokens=int(windows.numel()), blocks=n_blocks)
        writer.commit()
    journal.remove()
    console.print(f"calibrate: {params.samples} x {params.seqlen} tokens, {n_blocks} blocks -> {out}")
    return {"stage": "calibrate", "out": str(out), "skipped": False, "tokens": int(windows.numel()), "blocks": n_blocks, "seconds": round(time.time() - t0, 2)}
