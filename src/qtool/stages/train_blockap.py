"""`qtool train-blockap`: block-wise training (OmniQuant, EfficientQAT Block-AP, ABQ-LLM).

The stage holds the folded float weights (transformations absorbed, ready to be quantized) and
`qtool-blockap.safetensors` with the learned per-group scale and zero of every block linear
(`layers.{i}.{linear}.scale|zero`); its manifest records the spec, so `qtool eval STAGE` quantizes
with the learned parameters. Learning rates left unset take the preset's defaults.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from qtool.core.checkpoint import BlockJournal, StageWriter, TextStageParams
from qtool.core.devices import pick_device
from qtool.core.errors import QtoolError
from qtool.core.progress import console, progress
from qtool.core.spec import parse_spec
from qtool.models.adapters import adapter_for
from qtool.quant.blockwise_train import PRESETS, TrainSettings, train_blocks
from qtool.quant.qparams import QPARAMS, model_qparams
from qtool.runtime.loader import load, open_source
from qtool.stages.base import fingerprint_or_skip, training_windows


@dataclass(frozen=True)
class BlockAPParams(TextStageParams):
    preset: str = "omniquant"
    spec: str = "W4A16-g128"
    epochs: int = 2
    batch: int = 1
    lr_let: float | None = None
    lr_lwc: float | None = None
    lr_weight: float | None = None
    lr_qparams: float | None = None
    lr_comp: float | None = None
    cosine: bool | None = None  # None: the preset's choice
    alpha: float = 0.5

    def settings(self) -> TrainSettings:
        preset = PRESETS[self.preset]
        given = {
            "let": self.lr_let,
            "lwc": self.lr_lwc,
            "weight": self.lr_weight,
            "qparams": self.lr_qparams,
            "comp": self.lr_comp,
        }
        lr = {k: given[k] if given[k] is not None else v for k, v in preset.lr.items()}
        cosine = preset.cosine if self.cosine is None else self.cosine
        return TrainSettings(self.epochs, self.batch, self.seed, lr, cosine, self.alpha)


def _check(params: BlockAPParams):
    if params.preset not in PRESETS:
        raise QtoolError(f"unknown preset '{params.preset}'; use one of {', '.join(PRESETS)}")
    spec = parse_spec(params.spec)
    if spec.is_float:
        raise QtoolError(f"{spec.name} quantizes nothing; give a spec such as W4A16-g128 or W4A4")
    if spec.quantizes_activations and (spec.a_static or spec.a_granularity != "token"):
        raise QtoolError(
            f"{spec.name}: train-blockap trains with dynamic per-token activations; drop -tensor/-cluster/-static"
        )
    if params.epochs < 1 or params.batch < 1 or params.samples < params.batch:
        raise QtoolError("need epochs >= 1, batch size >= 1 and at least one batch of samples")
    return spec


def train_blockap(params: BlockAPParams, device: str = "auto", batch_size: int = 1) -> dict:
    """Run the stage (or find it already complete) and return its summary."""
    spec = _check(params)
    source = open_source(params.model)
    out = Path(params.out)
    fingerprint, skipped = fingerprint_or_skip("train-blockap", params, source)
    if skipped:
        return skipped
    dev = pick_device(device)
    t0 = time.time()
    model, tokenizer = load(source)
    adapter = adapter_for(model.config)
    windows = training_windows(tokenizer, params)
    journal = BlockJournal(out, fingerprint)
    attention = model.config._attn_implementation
    with (
        progress() as bar,
        StageWriter(out, "train-blockap", params.fingerprint_params(), source, spec=spec.name) as writer,
    ):
        task = bar.add_task(f"{params.preset} {spec.name}", total=len(adapter.layers(model)), info="")

        def on_block(index, n):
            bar.update(task, completed=index, info=f"block {index + 1}/{n}")

        def on_epoch(index, epoch, loss):
            bar.update(task, info=f"block {index + 1} epoch {epoch + 1}/{params.epochs} loss {loss:.4g}")

        qparams, losses = train_blocks(
            model,
            adapter,
            spec,
            PRESETS[params.preset],
            params.settings(),
            windows,
            dev,
            journal,
            batch_size,
            on_block,
            on_epoch,
        )
        bar.update(task, completed=len(adapter.layers(model)), info="done")
        model.set_attn_implementation(attention)
        writer.save_model(model)
        if spec.quantizes_weights:
            writer.save_tensors(QPARAMS, model_qparams(model, adapter, spec, qparams))
        writer.timings["train_s"] = round(time.time() - t0, 3)
        writer.metrics.update(tokens=int(windows.numel()), **losses)
        writer.commit()
    journal.remove()
    seconds = round(time.time() - t0, 2)
    console.print(
        f"train-blockap: {params.preset} {spec.name}, {params.samples} x {params.seqlen} tokens, "
        f"{params.epochs} epochs in {seconds} s -> {out}"
    )
    return {
        "stage": "train-blockap",
        "out": str(out),
        "skipped": False,
        "preset": params.preset,
        "spec": spec.name,
        "tokens": int(windows.numel()),
        "seconds": seconds,
        "last_block_loss": losses[f"block{len(losses) - 1}.loss"],
    }
