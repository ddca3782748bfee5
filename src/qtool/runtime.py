"""Shared plumbing of every stage: devices, opening a model or stage, progress bars."""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from qtool.checkpoint import (
    Stage,
    check_model_files,
    is_complete,
    open_stage,
    stage_fingerprint,
)
from qtool.data import calibration_windows, read_text, token_ids
from qtool.errors import QtoolError
from qtool.models.loading import load_model, load_tokenizer, resolve_model

console = Console(stderr=True)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise QtoolError(f"unknown device '{name}'; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise QtoolError(f"device '{name}' asked for but only {torch.cuda.device_count()} CUDA GPU(s) are visible; use --device cpu or another index")
    return device


def pick_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise QtoolError(f"unknown dtype '{name}'; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def open_source(ref: str) -> Stage:
    """Resolve a model reference to a checked model or stage directory."""
    path = resolve_model(ref)
    stage = open_stage(path)
    check_model_files(path)
    return stage


def load(stage: Stage, dtype: torch.dtype = torch.float32):
    """(model on CPU, tokenizer) of a model or stage directory. A reordered stage (RPTQ) gets its
    norms' output gathers back: they are part of the model but not of the transformers weights.
    A packed checkpoint (`qtool pack`) loads with its packed linears."""
    from qtool.packed.model import load_packed, read_quantization_config

    if read_quantization_config(stage.path) is not None:
        return load_packed(stage.path, dtype), load_tokenizer(stage.path)
    model = load_model(stage.path, dtype=dtype, device="cpu")
    if stage.has_tensors("reorder"):
        from qtool.models.adapters import adapter_for
        from qtool.quant.reorder import install_gathers

        install_gathers(model, adapter_for(model.config), stage.tensors("reorder"))
    return model, load_tokenizer(stage.path)


def cast_parameters(model, dtype: torch.dtype, keep=()) -> None:
    """Float parameters but those in `keep` to `dtype`, in place, as `load(stage, dtype)` leaves them
    (buffers such as rotary frequencies stay as they are). eval and pack load in fp32 and cast after
    or around quantization: codes and scales come from the stored weights, whatever the dtype."""
    kept = {id(p) for p in keep}
    for p in model.parameters():
        if p.is_floating_point() and id(p) not in kept:
            p.data = p.data.to(dtype)
    model.config.dtype = dtype


class _InfoColumn(ProgressColumn):
    """The task's `info` field (block, loss, rate), blank for tasks that set none."""

    def render(self, task) -> Text:
        return Text(str(task.fields.get("info", "")))


def progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _InfoColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


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
