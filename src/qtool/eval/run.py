"""`qtool eval`: perplexity of a model or stage, optionally fake-quantized by a spec on the fly."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from qtool.data import eval_windows, read_text, token_ids
from qtool.eval.memory import memory_report
from qtool.eval.perplexity import perplexity, window_nlls
from qtool.models.adapters import adapter_for
from qtool.quant.fakequant import apply_spec
from qtool.quant.qparams import stage_qparams
from qtool.quant.reorder import cluster_bounds
from qtool.runtime import load, open_source, pick_device, pick_dtype, progress
from qtool.errors import QtoolError
from qtool.spec import parse_spec, same_weight_format


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

    def fingerprint_params(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "model"}


def evaluate(params: EvalParams, device: str = "auto", batch_size: int = 1) -> dict:
    """Perplexity and memory accounting; returns the result as a flat dict."""
    source = open_source(params.model)
    spec = parse_spec(params.spec or source.spec or "W16A16")
    dev = pick_device(device)
    t0 = time.time()
    model, tokenizer = load(source, pick_dtype(params.dtype))
    adapter = adapter_for(model.config)
    stats = source.tensors("calibrate") if source.has_tensors("calibrate") else None
    qparams = stage_qparams(source)
    if qparams is not None and source.spec and not same_weight_format(spec, parse_spec(source.spec)):
        raise QtoolError(f"{source.path} holds {source.spec} weights; a --spec must keep that weight part (activations and KV may change)")
    clusters = cluster_bounds(source.tensors("reorder"), adapter, model.config) if source.has_tensors("reorder") else None
    apply_spec(model, adapter, spec, stats, qparams, clusters)
    model.to(dev)
    ids = token_ids(tokenizer, read_text(params.data, params.text_field))
    windows = eval_windows(ids, params.seqlen, params.windows, params.data)
    with progress() as bar:
        task = bar.add_task(f"eval {spec.name}", total=windows.shape[0], info=f"{params.seqlen} tokens/window")
        nlls = window_nlls(model, windows, dev, batch_size, on_batch=lambda n: bar.update(task, advance=n))
    memory = memory_report(model.config, adapter, spec, params.mem_batch, params.mem_seqlen)
    return {
        "model": str(source.path),
        "stage": source.name,
        "spec": spec.name,
        "data": params.data,
        "ppl": perplexity(nlls),
        "seqlen": params.seqlen,
        "windows": int(windows.shape[0]),
        "tokens": int(windows.numel()),
        "device": str(dev),
        "dtype": params.dtype,
        "seconds": round(time.time() - t0, 2),
        "memory": memory.as_dict(),
    }
