"""`qtool eval`: perplexity of a model or stage, optionally fake-quantized by a spec on the fly."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qtool.core.data import eval_windows, read_text, token_ids
from qtool.core.devices import cast_parameters, pick_device, pick_dtype
from qtool.core.errors import QtoolError
from qtool.core.progress import progress
from qtool.core.spec import parse_spec, same_weight_format
from qtool.metrics.memory import memory_report
from qtool.metrics.perplexity import perplexity, window_nlls
from qtool.metrics.tasks import evaluate_tasks
from qtool.models.adapters import adapter_for
from qtool.quant.fakequant import apply_spec
from qtool.quant.qparams import stage_qparams
from qtool.quant.rptq import cluster_bounds
from qtool.runtime.loader import load, open_source
from qtool.runtime.packed_model import (
    packed_bytes,
    read_quantization_config,
    to_kernel_form,
)


@dataclass(frozen=True)
class EvalParams:
    model: str
    spec: str | None = None  # None: the stage's own spec (W16A16 for a float model)
    data: str = "wikitext2-test"
    seqlen: int = 2048
    windows: int | None = None  # None: every window of the split
    text_field: str = "text"
    dtype: str = "float32"
    mem_batch: int = 1
    mem_seqlen: int = 2048
    tasks: str | None = None  # comma-separated zero-shot tasks; perplexity is then skipped unless ppl=True
    limit: int | None = None  # first N documents of each task
    task_data: str | None = None  # task=path,... replacing bundled task files
    ppl: bool | None = None  # None: perplexity when no tasks are asked for

    def fingerprint_params(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "model"}


def _task_list(params: EvalParams) -> tuple[list[str], dict[str, Path]]:
    tasks = [t.strip() for t in (params.tasks or "").split(",") if t.strip()]
    data_paths = {}
    for item in (params.task_data or "").split(","):
        if item.strip():
            task, sep, path = item.partition("=")
            if not sep or not path:
                raise QtoolError(f"--task-data '{item}' must read TASK=PATH, e.g. piqa=/data/piqa.jsonl")
            data_paths[task.strip()] = Path(path.strip())
    return tasks, data_paths


def evaluate(params: EvalParams, device: str = "auto", batch_size: int = 1) -> dict:
    """Perplexity, zero-shot accuracy and memory accounting; returns the result as a dict."""
    tasks, data_paths = _task_list(params)
    want_ppl = params.ppl if params.ppl is not None else not tasks
    source = open_source(params.model)
    packed = read_quantization_config(source.path) is not None
    if packed and params.spec and parse_spec(params.spec) != parse_spec(source.spec):
        raise QtoolError(
            f"{source.path} is packed for {source.spec}; drop --spec (a packed checkpoint runs its own spec)"
        )
    spec = parse_spec(params.spec or source.spec or "W16A16")
    dev = pick_device(device)
    dtype = pick_dtype(params.dtype)
    t0 = time.time()
    # fake quantization reads the stored weights in fp32, then casts: a packed checkpoint's codes
    # and scales come from those too, so the stage's fp16 weights are the kernels' dequantization
    model, tokenizer = load(source, torch.float32 if spec.quantizes_weights and not packed else dtype)
    adapter = adapter_for(model.config)
    stats = source.tensors("calibrate") if source.has_tensors("calibrate") else None
    qparams = stage_qparams(source)
    if qparams is not None and source.spec and not same_weight_format(spec, parse_spec(source.spec)):
        raise QtoolError(
            f"{source.path} holds {source.spec} weights; a --spec must keep that weight part (activations and KV may change)"
        )
    clusters = (
        cluster_bounds(source.tensors("reorder"), adapter, model.config) if source.has_tensors("reorder") else None
    )
    if packed:
        model.to(dev)
        if dev.type == "cuda" and dtype != torch.float32:
            to_kernel_form(model)  # 16-bit: the kernels; fp32 keeps the fp32 scales (PackedLinear.forward)
    else:
        apply_spec(model, adapter, spec, stats, qparams, clusters)
        cast_parameters(model, dtype)
        model.to(dev)
    result: dict = {"ppl": None, "windows": 0, "tokens": 0}
    if want_ppl:
        ids = token_ids(tokenizer, read_text(params.data, params.text_field))
        windows = eval_windows(ids, params.seqlen, params.windows, params.data)
        with progress() as bar:
            task = bar.add_task(f"eval {spec.name}", total=windows.shape[0], info=f"{params.seqlen} tokens/window")
            nlls = window_nlls(model, windows, dev, batch_size, on_batch=lambda n: bar.update(task, advance=n))
        result = {"ppl": perplexity(nlls), "windows": int(windows.shape[0]), "tokens": int(windows.numel())}
    if tasks:
        with progress() as bar:
            result["tasks"] = evaluate_tasks(model, tokenizer, tasks, params.limit, batch_size, data_paths, bar)
    memory = memory_report(model.config, adapter, spec, params.mem_batch, params.mem_seqlen)
    return {
        "model": str(source.path),
        "stage": source.name,
        "spec": spec.name,
        "data": params.data,
        "seqlen": params.seqlen,
        **result,
        "device": str(dev),
        "dtype": params.dtype,
        "seconds": round(time.time() - t0, 2),
        "memory": memory.as_dict(),
        **({"packed_bytes": packed_bytes(model)} if packed else {}),
    }
