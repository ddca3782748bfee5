"""`qtool calibrate`: per-channel activation statistics from calibration text.

For every linear of every block: min, max and absmax of each input channel; for the query, key
and value projections also of each output channel. Reorder (RPTQ), LET initialisation
(OmniQuant) and static activation ranges all read these.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from qtool.core import distributed
from qtool.core.progress import progress
from qtool.models.blockwise import capture_block_inputs, iterate_blocks, run_block
from qtool.quant.stats import block_stats
from qtool.stages.base import BATCH_HELP, Run, Stage, StageResult, TextStageParams, param


@dataclass(frozen=True)
class CalibrateParams(TextStageParams):
    """Calibration needs only its text windows."""

    batch_size: int = param(1, BATCH_HELP, min=1, result=False)


@dataclass(kw_only=True)
class CalibrateResult(StageResult):
    tokens: int
    blocks: int

    def summary(self) -> str:
        return f"calibrate: {self.tokens} tokens, {self.blocks} blocks -> {self.out}"


class Calibrate(Stage):
    name = "calibrate"
    params = CalibrateParams
    help = "Per-channel activation statistics (min, max, absmax) at every linear input and q/k/v output."
    distributed = True

    @torch.no_grad()
    def work(self, run: Run) -> CalibrateResult:
        dev = run.device()
        model, tokenizer, adapter = run.load()
        windows = run.windows(tokenizer)
        # each rank carries its share of the windows; block_stats reduces the statistics over the ranks
        hidden, kwargs = capture_block_inputs(model, adapter, distributed.shard(windows), dev)
        journal = run.journal()
        stats: dict[str, torch.Tensor] = {}
        n_blocks = len(adapter.layers(model))
        t_blocks = time.time()
        with progress() as bar, run.writer() as writer:
            task = bar.add_task("calibrate", total=n_blocks, info="")
            for index, block in iterate_blocks(model, adapter, dev):
                done = journal.load(index)
                if done is None:
                    done, hidden = block_stats(block, adapter, index, hidden, kwargs, run.params.batch_size)
                    journal.save(index, done)
                else:
                    hidden = run_block(block, hidden, kwargs, run.params.batch_size)
                stats.update(done)
                bar.update(task, advance=1, info=f"block {index + 1}/{n_blocks}")
            writer.timings["blocks_s"] = round(time.time() - t_blocks, 3)  # the block loop alone
            writer.save_tensors("calibrate", stats)
            run.commit(writer, tokens=int(windows.numel()), blocks=n_blocks)
        return CalibrateResult(
            stage=self.name, out=str(run.out), tokens=int(windows.numel()), blocks=n_blocks, seconds=run.seconds()
        )


calibrate = Calibrate()
