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
from pathlib import Path

import torch

from qtool.core.checkpoint import BlockJournal, StageWriter, TextStageParams
from qtool.core.devices import pick_device
from qtool.core.errors import QtoolError
from qtool.core.progress import console, progress
from qtool.core.spec import parse_spec, same_weight_format
from qtool.models.adapters import adapter_for
from qtool.quant.qparams import QPARAMS, model_qparams, stage_qparams
from qtool.quant.step_sizes import (
    export_qparams,
    install_step_size_linears,
    restore_linears,
)
from qtool.runtime.loader import load, open_source
from qtool.stages.base import fingerprint_or_skip, training_windows


@dataclass(frozen=True)
class TuneE2EParams(TextStageParams):
    spec: str | None = None  # weight-only spec for a start from RTN; default: the stage's
    epochs: int = 1
    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    batch_size: int = 1
    grad_accum: int = 8
    max_grad_norm: float = 0.3
    grad_checkpointing: bool = True


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


def tune_e2e(params: TuneE2EParams, device: str = "auto", save_every: int = 20) -> dict:
    source = open_source(params.model)
    out = Path(params.out)
    spec_name = params.spec or source.spec
    if spec_name is None:
        raise QtoolError(
            f"{source.path} has no quantized weights; give --spec (e.g. W2A16-g64) to start from round-to-nearest, or a train-blockap stage"
        )
    spec = parse_spec(spec_name)
    if not spec.quantizes_weights or spec.quantizes_activations:
        raise QtoolError(
            f"tune-e2e trains weight-only quantization; {spec.name} is not weight-only (use e.g. W2A16-g64)"
        )
    stored = stage_qparams(source)
    if stored is not None and source.spec and not same_weight_format(spec, parse_spec(source.spec)):
        raise QtoolError(f"{source.path} holds {source.spec} weights, not {spec.name}; drop --spec to keep the stage's")
    fingerprint, skipped = fingerprint_or_skip("tune-e2e", params, source)
    if skipped:
        return skipped
    dev = pick_device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.time()
    model, tokenizer = load(source)
    adapter = adapter_for(model.config)
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

    windows = training_windows(tokenizer, params)
    micro = math.ceil(params.samples / params.batch_size)
    steps_per_epoch = math.ceil(micro / params.grad_accum)
    total = steps_per_epoch * params.epochs
    warmup = max(1, round(params.warmup_ratio * total))
    opt = torch.optim.AdamW(scales, lr=params.lr, weight_decay=params.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup))

    journal = BlockJournal(out, fingerprint)
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
            step_loss = 0.0
            for rows in chunk:
                batch = windows[rows].to(dev)
                with autocast:
                    loss = model(input_ids=batch, labels=batch).loss
                if not torch.isfinite(loss):
                    raise QtoolError(
                        f"tune-e2e: loss became {loss.item()} at step {step}; lower --lr or check the input stage"
                    )
                (loss * rows.numel() / sum(r.numel() for r in chunk)).backward()
                step_loss += loss.item() * rows.numel() / sum(r.numel() for r in chunk)
                tokens_done += batch.numel()
            torch.nn.utils.clip_grad_norm_(scales, params.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            losses.append(step_loss)
            rate = tokens_done / max(time.time() - t_train, 1e-9)
            bar.update(task, completed=step, info=f"epoch {epoch + 1} loss {step_loss:.4f} {rate:,.0f} tok/s")
            if step % save_every == 0 or step == total:
                journal.save(step, {**{f"scale.{i}": s for i, s in enumerate(scales)}, **_optimizer_tensors(opt)})
                journal.prune(step)

    peak = peak_memory_bytes(dev)
    model.eval()
    trained = export_qparams(model, adapter)
    restore_linears(model, adapter)
    with StageWriter(out, "tune-e2e", params.fingerprint_params(), source, spec=spec.name) as writer:
        writer.save_model(model.cpu())
        writer.save_tensors(QPARAMS, trained)
        writer.metrics.update(
            final_loss=losses[-1] if losses else None, steps=total, trainable_params=trainable, peak_memory_bytes=peak
        )
        writer.timings["train_s"] = round(time.time() - t0, 3)
        writer.commit()
    journal.remove()
    console.print(
        f"tune-e2e: {total} steps, {trainable:,} trainable step sizes, peak memory {peak / 2**20:.0f} MiB -> {out}"
    )
    return {
        "stage": "tune-e2e",
        "out": str(out),
        "skipped": False,
        "spec": spec.name,
        "steps": total,
        "final_loss": losses[-1] if losses else None,
        "trainable_params": trainable,
        "peak_memory_bytes": peak,
        "device": str(dev),
        "seconds": round(time.time() - t0, 2),
    }
