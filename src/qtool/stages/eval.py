"""`qtool eval`: perplexity of a model or stage, optionally fake-quantized by a spec on the fly."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from qtool.core.data import eval_windows, read_text, token_ids
from qtool.core.devices import DTYPES, cast_parameters, pick_dtype
from qtool.core.errors import QtoolError
from qtool.core.progress import progress
from qtool.core.spec import parse_spec
from qtool.metrics.memory import memory_report
from qtool.metrics.perplexity import perplexity, window_nlls
from qtool.metrics.tasks import evaluate_tasks, results_table
from qtool.quant.fakequant import apply_spec
from qtool.quant.qparams import learned_qparams
from qtool.quant.rptq import cluster_bounds
from qtool.runtime.packed_model import packed_bytes, read_quantization_config, to_kernel_form
from qtool.stages.base import BATCH_HELP, DEVICE_HELP, Params, Result, Run, Stage, param


@dataclass(frozen=True)
class EvalParams(Params):
    spec: str | None = param(
        None,
        "Quantization spec, e.g. W4A16-g128, W4A4 (default: the stage's own; W16A16 for a float model). "
        "Weights use the stage's learned scales when it has them, RTN otherwise.",
        check=parse_spec,
    )
    data: str = param("wikitext2-test", "wikitext2-test, wikitext2-valid, or a .txt/.jsonl file.")
    seqlen: int = param(2048, "Tokens per evaluation window.", min=2)
    windows: int | None = param(None, "Evaluate only the first N windows (default: all).", min=1)
    text_field: str = param("text", "Field holding the text in a .jsonl file.")
    dtype: str = param("float32", "Compute dtype.", choices=tuple(DTYPES))
    mem_batch: int = param(1, "Batch size for the KV-cache memory accounting.", min=1)
    mem_seqlen: int = param(2048, "Sequence length for the KV-cache memory accounting.", min=1)
    tasks: str | None = param(
        None, "Zero-shot tasks, comma-separated: piqa,arc_easy,arc_challenge,winogrande,boolq,lambada_openai."
    )
    limit: int | None = param(None, "Score only the first N documents of each task.", min=1)
    task_data: str | None = param(None, "Replace bundled task files: TASK=PATH[,TASK=PATH].")
    ppl: bool | None = param(None, "Perplexity too (default: only when no --tasks).", flags=("--ppl/--no-ppl",))
    device: str = param("auto", DEVICE_HELP, result=False)
    batch_size: int = param(1, BATCH_HELP, min=1, result=False)


@dataclass(kw_only=True)
class EvalResult(Result):
    model: str
    stage: str | None  # the evaluated directory's stage (None: a plain model)
    spec: str
    data: str
    seqlen: int
    ppl: float | None
    windows: int
    tokens: int
    tasks: dict | None
    device: str
    dtype: str
    seconds: float
    memory: dict
    packed_bytes: int | None

    def rows(self) -> dict:
        mem = self.memory
        rows = {"model": self.model, "spec": self.spec}
        if self.ppl is not None:
            rows.update({"perplexity": self.ppl, "windows x seqlen": f"{self.windows} x {self.seqlen}"})
        weights = (
            f"{mem['weight_bytes'] / 2**20:.1f} MiB ({mem['weight_bits_per_param']:.3f} bits/param in block linears)"
        )
        rows["weights"] = weights
        rows[f"KV cache (batch {mem['batch']}, {mem['seqlen']} tokens)"] = f"{mem['kv_bytes'] / 2**20:.1f} MiB"
        rows["time"] = f"{self.seconds} s on {self.device}"
        return rows

    def tables(self) -> list:
        return [results_table(self.tasks, title=f"zero-shot, {self.spec}")] if self.tasks else []


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


class Evaluate(Stage):
    """Perplexity, zero-shot accuracy and memory accounting of a model or stage; writes no stage."""

    name = "eval"
    params = EvalParams
    writes = False
    help = (
        "Perplexity (WikiText-2 protocol), zero-shot accuracy (lm-evaluation-harness 0.4 rules) and "
        "weight / KV-cache memory of a model or stage."
    )

    def check(self, params: EvalParams, source) -> None:
        _task_list(params)
        packed = read_quantization_config(source.path) is not None
        if packed and params.spec and parse_spec(params.spec) != parse_spec(source.spec):
            raise QtoolError(
                f"{source.path} is packed for {source.spec}; drop --spec (a packed checkpoint runs its own spec)"
            )
        if not packed:
            learned_qparams(source, parse_spec(params.spec or source.spec or "W16A16"))

    def work(self, run: Run) -> EvalResult:
        params, source = run.params, run.source
        tasks, data_paths = _task_list(params)
        want_ppl = params.ppl if params.ppl is not None else not tasks
        packed = read_quantization_config(source.path) is not None
        spec = parse_spec(params.spec or source.spec or "W16A16")
        dev = run.device()
        dtype = pick_dtype(params.dtype)
        batch_size = params.batch_size
        # fake quantization reads the stored weights in fp32, then casts: a packed checkpoint's codes
        # and scales come from those too, so the stage's fp16 weights are the kernels' dequantization
        model, tokenizer, adapter = run.load(torch.float32 if spec.quantizes_weights and not packed else dtype)
        stats = source.tensors("calibrate") if source.has_tensors("calibrate") else None
        qparams = None if packed else learned_qparams(source, spec)
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
        ppl, n_windows, tokens, scores = None, 0, 0, None
        if want_ppl:
            ids = token_ids(tokenizer, read_text(params.data, params.text_field))
            windows = eval_windows(ids, params.seqlen, params.windows, params.data)
            with progress() as bar:
                task = bar.add_task(f"eval {spec.name}", total=windows.shape[0], info=f"{params.seqlen} tokens/window")
                nlls = window_nlls(model, windows, dev, batch_size, on_batch=lambda n: bar.update(task, advance=n))
            ppl, n_windows, tokens = perplexity(nlls), int(windows.shape[0]), int(windows.numel())
        if tasks:
            with progress() as bar:
                scores = evaluate_tasks(model, tokenizer, tasks, params.limit, batch_size, data_paths, bar)
        memory = memory_report(model.config, adapter, spec, params.mem_batch, params.mem_seqlen)
        return EvalResult(
            model=str(source.path),
            stage=source.name,
            spec=spec.name,
            data=params.data,
            seqlen=params.seqlen,
            ppl=ppl,
            windows=n_windows,
            tokens=tokens,
            tasks=scores,
            device=str(dev),
            dtype=params.dtype,
            seconds=run.seconds(),
            memory=memory.as_dict(),
            packed_bytes=packed_bytes(model) if packed else None,
        )


evaluate = Evaluate()
