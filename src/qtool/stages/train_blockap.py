"""`qtool train-blockap`: block-wise training (OmniQuant, EfficientQAT Block-AP, ABQ-LLM).

The stage holds the folded float weights (transformations absorbed, ready to be quantized) and
`qtool-blockap.safetensors` with the learned per-group scale and zero of every block linear
(`layers.{i}.{linear}.scale|zero`); its manifest records the spec, so `qtool eval STAGE` quantizes
with the learned parameters. Learning rates left unset take the preset's defaults.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from qtool.core import distributed
from qtool.core.errors import QtoolError
from qtool.core.progress import progress
from qtool.core.spec import parse_spec
from qtool.quant.blockwise_train import PRESETS, TrainSettings, train_blocks
from qtool.quant.qparams import QPARAMS, model_qparams
from qtool.stages.base import Run, Stage, StageResult, TextStageParams, param

LR = dict(above=0.0)


@dataclass(frozen=True)
class BlockAPParams(TextStageParams):
    preset: str = param("omniquant", "Method preset.", choices=tuple(PRESETS))
    spec: str = param("W4A16-g128", "Target spec, e.g. W4A16-g128, W2A16-g64, W4A4, W2*A8-g128.", check=parse_spec)
    epochs: int = param(2, "Passes over the calibration windows per block.", min=1)
    batch: int = param(1, "Windows per training step (and per forward pass).", min=1, flags=("--batch-size",))
    lr_let: float | None = param(None, "LET learning rate (preset default).", **LR)
    lr_lwc: float | None = param(None, "Clipping (LWC) learning rate (preset default).", **LR)
    lr_weight: float | None = param(None, "Weight learning rate, efficientqat (preset default).", **LR)
    lr_qparams: float | None = param(None, "Scale/zero learning rate, efficientqat (preset default).", **LR)
    lr_comp: float | None = param(None, "Compensation-vector learning rate, abq (preset default).", **LR)
    cosine: bool | None = param(
        None, "Cosine learning-rate schedule (preset default).", flags=("--cosine/--no-cosine",)
    )
    alpha: float = param(0.5, "LET migration strength.", min=0.0, max=1.0)
    batch_size: int | None = param(None, "Windows per forward pass (default: batch).", min=1, result=False, cli=False)

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


@dataclass(kw_only=True)
class BlockAPResult(StageResult):
    preset: str
    spec: str
    tokens: int
    epochs: int
    last_block_loss: float

    def summary(self) -> str:
        return (
            f"train-blockap: {self.preset} {self.spec}, {self.tokens} tokens, "
            f"{self.epochs} epochs in {self.seconds} s -> {self.out}"
        )


class TrainBlockAP(Stage):
    name = "train-blockap"
    params = BlockAPParams
    help = "Block-wise training of the quantized model; saves folded weights and learned scales/zeros."
    distributed = True

    def check_world(self, params: BlockAPParams, n: int) -> None:
        """Both the windows and each training batch split evenly over the n processes."""
        super().check_world(params, n)
        distributed.require_split("--batch-size", params.batch, n)

    def check(self, params: BlockAPParams, source) -> None:
        from qtool.runtime.packed_model import read_quantization_config

        if read_quantization_config(source.path) is not None:
            raise QtoolError(f"{source.path} is a packed checkpoint; train the stage it was packed from")
        spec = parse_spec(params.spec)
        if spec.is_float:
            raise QtoolError(f"{spec.name} quantizes nothing; give a spec such as W4A16-g128 or W4A4")
        if spec.quantizes_activations and (spec.a_static or spec.a_granularity != "token"):
            raise QtoolError(
                f"{spec.name}: train-blockap trains with dynamic per-token activations; drop -tensor/-cluster/-static"
            )
        if params.samples < params.batch:
            raise QtoolError(f"--samples {params.samples} is less than one batch (--batch-size {params.batch})")

    def work(self, run: Run) -> BlockAPResult:
        p = run.params
        spec = parse_spec(p.spec)
        dev = run.device()
        model, tokenizer, adapter = run.load()
        windows = run.windows(tokenizer)
        attention = model.config._attn_implementation
        n_blocks = len(adapter.layers(model))
        with progress() as bar, run.writer(spec=spec.name) as writer:
            task = bar.add_task(f"{p.preset} {spec.name}", total=n_blocks, info="")

            def on_block(index, n):
                bar.update(task, completed=index, info=f"block {index + 1}/{n}")

            def on_epoch(index, epoch, loss):
                bar.update(task, info=f"block {index + 1} epoch {epoch + 1}/{p.epochs} loss {loss:.4g}")

            forward_batch = p.batch if p.batch_size is None else p.batch_size
            preset, settings = PRESETS[p.preset], p.settings()
            t_blocks = time.time()
            qparams, losses = train_blocks(
                model, adapter, spec, preset, settings, windows, dev, run.journal(), forward_batch, on_block, on_epoch
            )
            writer.timings["blocks_s"] = round(time.time() - t_blocks, 3)  # capture and the block loop
            bar.update(task, completed=n_blocks, info="done")
            model.set_attn_implementation(attention)
            writer.save_model(model)
            if spec.quantizes_weights:
                writer.save_tensors(QPARAMS, model_qparams(model, adapter, spec, qparams))
            run.commit(writer, tokens=int(windows.numel()), **losses)
        return BlockAPResult(
            stage=self.name,
            out=str(run.out),
            preset=p.preset,
            spec=spec.name,
            tokens=int(windows.numel()),
            epochs=p.epochs,
            seconds=run.seconds(),
            last_block_loss=losses[f"block{len(losses) - 1}.loss"],
        )


train_blockap = TrainBlockAP()
