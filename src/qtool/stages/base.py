"""What every stage shares: the skip of a stage already complete, and its training windows."""

from __future__ import annotations

from pathlib import Path

import torch

from qtool.core.checkpoint import Stage, is_complete, stage_fingerprint
from qtool.core.data import calibration_windows, read_text, token_ids
from qtool.core.progress import console


def fingerprint_or_skip(stage: str, params, source: Stage) -> tuple[str, dict | None]:
    """The stage's fingerprint, and the summary to return when `params.out` already holds this
    exact stage (same inputs and parameters), so reruns of a recipe skip finished work."""
    fingerprint = stage_fingerprint(stage, params.fingerprint_params(), source)
    if is_complete(Path(params.out), fingerprint):
        console.print(f"[green]{stage}: {params.out} is complete for these inputs, skipped[/green]")
        return fingerprint, {"stage": stage, "out": str(params.out), "skipped": True}
    return fingerprint, None


def training_windows(tokenizer, params) -> torch.Tensor:
    """The calibration / training windows a stage's parameters ask for (data, text_field,
    samples, seqlen, seed)."""
    ids = token_ids(tokenizer, read_text(params.data, params.text_field))
    return calibration_windows(ids, params.samples, params.seqlen, params.seed, params.data)
