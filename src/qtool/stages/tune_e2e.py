"""`qtool tune-e2e`: E2E-QP, end-to-end training of the step sizes with the codes frozen.

The input is any stage with weight quantization parameters (train-blockap's output, usually), or
any model plus a weight-only `--spec`, which starts from round-to-nearest. Training uses the causal
language-model loss on calibration text; AdamW on fp32 step sizes, linear warm-up then cosine
decay, gradient clipping and accumulation, gradient checkpointing, bf16 autocast on GPU.
A checkpoint (step sizes, optimizer moments, step) every `save_every` optimizer steps lets a
killed run resume and reach the same result.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass

import torch

from qtool.core import distributed
from qtool.core.errors import QtoolError
from qtool.core.progress import console, progress
from qtool.core.spec import parse_spec
from qtool.quant.qparams import QPARAMS, learned_qparams, model_qparams
from qtool.quant.step_sizes import export_qparams, install_step_size_linears, restore_linears
from qtool.stages.base import Run, Stage, StageResult, TextStageParams, param


@dataclass(frozen=True)
class TuneE2EParams(TextStageParams):
    spec: str | None = param(None, "Weight-only spec (e.g. W2A16-g64); default: the stage's own.", check=parse_spec)
    epochs: int = param(1, "Passes over the training windows.", min=1)
    lr: float = param(2e-5, "AdamW learning rate of the step sizes.", above=0.0)
    weight_decay: float = param(0.0, "AdamW weight decay.", min=0.0)
    warmup_ratio: float = param(0.03, "Fraction of steps of linear warm-up before the cosine decay.", min=0.0, max=1.0)
    batch_size: int = param(1, "Windows per micro-batch.", min=1)
    grad_accum: int = param(8, "Micro-batches per optimizer step.", min=1)
    max_grad_norm: float = param(0.3, "Gradient clipping norm.", above=0.0)
    grad_checkpointing: bool = param(True, "Recompute block activations in the backward pass.")
    save_every: int = param(20, "Checkpoint every N optimizer steps (for resume).", min=1, result=False)


@dataclass(kw_only=True)
class TuneE2EResult(StageResult):
    spec: str
    steps: int
    final_loss: float | None
    trainable_params: int
    peak_memory_bytes: int
    device: str

    def summary(self) -> str:
        return (
            f"tune-e2e: {self.steps} steps, {self.trainable_params:,} trainable step sizes, "
            f"peak memory {self.peak_memory_bytes / 2**20:.0f} MiB -> {self.out}"
        )

    def rows(self) -> dict:
        keys = ("out", "spec", "steps", "final_loss", "trainable_params", "device", "seconds")
        return {**{k: getattr(self, k) for k in keys}, "peak memory": f"{self.peak_memory_bytes / 2**20:.0f} MiB"}


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress_ = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_)))


def _optimizer_tensors(opt: torch.optim.AdamW) -> dict[str, torch.Tensor]:
    out = {}
    for index, state in opt.state_dict()["state"].items():
        for name, value in state.items():
            out[f"optim.{index}.{name}"] = torch.as_tensor(value).float() if name == "step" else value
    return out


def _load_optimizer(opt: torch.optim.AdamW, tensors: dict[str, torch.Tensor]) -> None:
    state_dict = opt.state_dict()
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    state_dict["state"] = state
    opt.load_state_dict(state_dict)


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA max allocated on GPU, the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class TuneE2E(Stage):
    name = "tune-e2e"
    params = TuneE2EParams
    help = "E2E-QP: train the per-group step sizes end to end (codes and zero points frozen)."
    distributed = True
    model_help = "A quantized stage (train-blockap output), or any model with --spec (starts from RTN)."

    def check(self, params: TuneE2EParams, source) -> None:
        from qtool.runtime.packed_model import read_quantization_config

        if read_quantization_config(source.path) is not None:
            raise QtoolError(f"{source.path} is a packed checkpoint; train the stage it was packed from")
        spec_name = params.spec or source.spec
        if spec_name is None:
            raise QtoolError(
                f"{source.path} has no quantized weights; give --spec (e.g. W2A16-g64) to start from "
                "round-to-nearest, or a train-blockap stage"
            )
        spec = parse_spec(spec_name)
        if not spec.quantizes_weights or spec.quantizes_activations:
            raise QtoolError(
                f"tune-e2e trains weight-only quantization; {spec.name} is not weight-only (use e.g. W2A16-g64)"
            )
        learned_qparams(source, spec)

    def work(self, run: Run) -> TuneE2EResult:
        params = run.params
        spec = parse_spec(params.spec or run.source.spec)
        stored = learned_qparams(run.source, spec)
        dev = run.device()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        model, tokenizer, adapter = run.load()
        start = model_qparams(model, adapter, spec, stored)
        modules = install_step_size_linears(model, adapter, start, spec.group)
        model.to(dev)
        if params.grad_checkpointing:
            # transformers renamed the switch in 5.2x; either recomputes each block in the backward pass
            enable = getattr(model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        model.train()
        scales = [m.scale for m in modules]
        trainable = sum(s.numel() for s in scales)

        windows = run.windows(tokenizer)
        micro = math.ceil(params.samples / params.batch_size)
        steps_per_epoch = math.ceil(micro / params.grad_accum)
        total = steps_per_epoch * params.epochs
        warmup = max(1, round(params.warmup_ratio * total))
        opt = torch.optim.AdamW(scales, lr=params.lr, weight_decay=params.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup))

        journal = run.journal()
        step, losses = 0, []
        resumed = journal.latest()
        if resumed is not None:
            step, saved = resumed
            with torch.no_grad():
                for i, s in enumerate(scales):
                    s.copy_(saved[f"scale.{i}"].to(s.device))
            _load_optimizer(opt, {k: v.to(dev) for k, v in saved.items()})
            sched.last_epoch = step
            for group in opt.param_groups:
                group["lr"] = params.lr * lr_factor(step, total, warmup)
            console.print(f"tune-e2e: resumed at step {step}/{total}")

        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
        )
        tokens_done, t_train = 0, time.time()
        with progress() as bar:
            task = bar.add_task("tune-e2e", total=total, completed=step, info="")
            while step < total:
                epoch, in_epoch = divmod(step, steps_per_epoch)
                order = torch.randperm(params.samples, generator=torch.Generator().manual_seed(params.seed + epoch))
                batches = [order[i : i + params.batch_size] for i in range(0, params.samples, params.batch_size)]
                chunk = batches[in_epoch * params.grad_accum : (in_epoch + 1) * params.grad_accum]
                n_rows = sum(r.numel() for r in chunk)
                if distributed.world_size() > 1:
                    # this rank's slice of the step's windows, in micro-batches; each micro-batch's
                    # loss weighs rows / n_rows, so the summed gradients are the one-process gradient
                    mine = distributed.my_slice(torch.cat(chunk))
                    chunk = [mine[i : i + params.batch_size] for i in range(0, len(mine), params.batch_size)]
                step_loss = 0.0
                for rows in chunk:
                    batch = windows[rows].to(dev)
                    with autocast:
                        loss = model(input_ids=batch, labels=batch).loss
                    if not torch.isfinite(loss):
                        raise QtoolError(
                            f"tune-e2e: loss became {loss.item()} at step {step}; lower --lr or check the input stage"
                        )
                    (loss * rows.numel() / n_rows).backward()
                    step_loss += loss.item() * rows.numel() / n_rows
                distributed.all_reduce_grads(scales, average=False)
                step_loss = distributed.sum_value(step_loss)
                tokens_done += n_rows * windows.shape[1]
                torch.nn.utils.clip_grad_norm_(scales, params.max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                losses.append(step_loss)
                rate = tokens_done / max(time.time() - t_train, 1e-9)
                bar.update(task, completed=step, info=f"epoch {epoch + 1} loss {step_loss:.4f} {rate:,.0f} tok/s")
                if step % params.save_every == 0 or step == total:
                    journal.save(step, {**{f"scale.{i}": s for i, s in enumerate(scales)}, **_optimizer_tensors(opt)})
                    journal.prune(step)

        peak = peak_memory_bytes(dev)
        model.eval()
        trained = export_qparams(model, adapter)
        restore_linears(model, adapter)
        final_loss = losses[-1] if losses else None
        with run.writer(spec=spec.name) as writer:
            writer.save_model(model.cpu())
            writer.save_tensors(QPARAMS, trained)
            run.commit(writer, final_loss=final_loss, steps=total, trainable_params=trainable, peak_memory_bytes=peak)
        return TuneE2EResult(
            stage=self.name,
            out=str(run.out),
            spec=spec.name,
            steps=total,
            final_loss=final_loss,
            trainable_params=trainable,
            peak_memory_bytes=peak,
            device=str(dev),
            seconds=run.seconds(),
        )


tune_e2e = TuneE2E()
