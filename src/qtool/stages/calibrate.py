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

from qtool.core.checkpoint import BlockJournal, StageWriter, TextStageParams
from qtool.core.devices import pick_device
from qtool.core.progress import console, progress
from qtool.models.adapters import adapter_for
from qtool.models.blockwise import capture_block_inputs, iterate_blocks, run_block
from qtool.quant.stats import block_stats
from qtool.runtime.loader import load, open_source
from qtool.stages.base import fingerprint_or_skip, training_windows


@dataclass(frozen=True)
class CalibrateParams(TextStageParams):
    """Calibration needs only its text windows."""


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
    return {
        "stage": "calibrate",
        "out": str(out),
        "skipped": False,
        "tokens": int(windows.numel()),
        "blocks": n_blocks,
        "seconds": round(time.time() - t0, 2),
    }
