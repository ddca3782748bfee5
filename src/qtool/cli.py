"""The `qtool` command line: thin commands that parse options, call one stage, print a summary."""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

import typer
from rich.table import Table

from qtool.core.errors import QtoolError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Quantize LLMs to low bit-widths (RPTQ, OmniQuant, EfficientQAT, ABQ-LLM) and run them.",
)

DEVICE = typer.Option("auto", help="Compute device: auto, cpu, cuda, cuda:N.")
JSON = typer.Option(False, "--json", help="Print one JSON object as the last line.")
BATCH = typer.Option(1, "--batch-size", min=1, help="Windows per forward pass.")


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _finish(result: dict, as_json: bool, table: Table | None = None) -> None:
    from qtool.core.progress import console

    if table is not None:
        console.print(table)
    if as_json:
        print(json.dumps(result, default=str))


def _kv_table(title: str, rows: dict) -> Table:
    table = Table(title=title, show_header=False)
    for key, value in rows.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    return table


@app.command()
def calibrate(
    model: str = typer.Argument(..., help="Model id (smollm2-135m), model directory or hub id."),
    out: str = typer.Option(..., "--out", "-o", help="Stage directory to write."),
    data: str = typer.Option("wikitext2-valid", help="wikitext2-valid, wikitext2-test, or a .txt/.jsonl file."),
    samples: int = typer.Option(128, min=1, help="Number of calibration windows."),
    seqlen: int = typer.Option(2048, min=2, help="Tokens per calibration window."),
    seed: int = typer.Option(0, help="Seed of the window sampling."),
    text_field: str = typer.Option("text", help="Field holding the text in a .jsonl file."),
    device: str = DEVICE,
    batch_size: int = BATCH,
    as_json: bool = JSON,
):
    """Per-channel activation statistics (min, max, absmax) at every linear input and q/k/v output."""
    from qtool.stages.calibrate import CalibrateParams
    from qtool.stages.calibrate import calibrate as run

    result = run(
        CalibrateParams(model, out, data=data, samples=samples, seqlen=seqlen, seed=seed, text_field=text_field),
        device,
        batch_size,
    )
    _finish(result, as_json)


@app.command("tune-e2e")
def tune_e2e(
    model: str = typer.Argument(
        ..., help="A quantized stage (train-blockap output), or any model with --spec (starts from RTN)."
    ),
    out: str = typer.Option(..., "--out", "-o", help="Stage directory to write."),
    spec: Optional[str] = typer.Option(None, help="Weight-only spec (e.g. W2A16-g64); default: the stage's own."),
    data: str = typer.Option("wikitext2-valid", help="wikitext2-valid, wikitext2-test, or a .txt/.jsonl file."),
    samples: int = typer.Option(128, min=1, help="Training windows."),
    seqlen: int = typer.Option(2048, min=2, help="Tokens per window."),
    seed: int = typer.Option(0, help="Seed of the window sampling and the data order."),
    text_field: str = typer.Option("text", help="Field holding the text in a .jsonl file."),
    epochs: int = typer.Option(1, min=1),
    lr: float = typer.Option(2e-5, help="AdamW learning rate of the step sizes."),
    weight_decay: float = typer.Option(0.0),
    warmup_ratio: float = typer.Option(0.03, help="Fraction of steps of linear warm-up before the cosine decay."),
    batch_size: int = typer.Option(1, min=1, help="Windows per micro-batch."),
    grad_accum: int = typer.Option(8, min=1, help="Micro-batches per optimizer step."),
    max_grad_norm: float = typer.Option(0.3, help="Gradient clipping norm."),
    grad_checkpointing: bool = typer.Option(True, help="Recompute block activations in the backward pass."),
    save_every: int = typer.Option(20, min=1, help="Checkpoint every N optimizer steps (for resume)."),
    device: str = DEVICE,
    as_json: bool = JSON,
):
    """E2E-QP: train the per-group step sizes end to end (codes and zero points frozen)."""
    from qtool.stages.tune_e2e import TuneE2EParams
    from qtool.stages.tune_e2e import tune_e2e as run

    params = TuneE2EParams(
        model,
        out,
        data=data,
        samples=samples,
        seqlen=seqlen,
        seed=seed,
        text_field=text_field,
        spec=spec,
        epochs=epochs,
        lr=lr,
        weight_decay=weight_decay,
        warmup_ratio=warmup_ratio,
        batch_size=batch_size,
        grad_accum=grad_accum,
        max_grad_norm=max_grad_norm,
        grad_checkpointing=grad_checkpointing,
    )
    result = run(params, device, save_every)
    rows = {
        k: result[k]
        for k in ("out", "spec", "steps", "final_loss", "trainable_params", "device", "seconds")
        if k in result
    }
    if "peak_memory_bytes" in result:
        rows["peak memory"] = f"{result['peak_memory_bytes'] / 2**20:.0f} MiB"
    _finish(result, as_json, _kv_table("qtool tune-e2e", rows))


@app.command()
def reorder(
    model: str = typer.Argument(..., help="A calibrate stage directory."),
    out: str = typer.Option(..., "--out", "-o", help="Stage directory to write."),
    clusters: int = typer.Option(32, min=1, help="Channel clusters per norm output (R1, R4) and MLP middle (R5)."),
    head_clusters: int = typer.Option(4, min=1, help="Channel clusters per KV head, for K (R2) and V (R3)."),
    seed: int = typer.Option(0, help="KMeans seed."),
    as_json: bool = JSON,
):
    """RPTQ: cluster channels by calibration range, fold the reordering into the weights."""
    from qtool.stages.reorder import ReorderParams
    from qtool.stages.reorder import reorder as run

    _finish(run(ReorderParams(model, out, clusters=clusters, head_clusters=head_clusters, seed=seed)), as_json)


@app.command()
def memory(
    model: str = typer.Argument(..., help="A config.json file (see configs/), model id or model directory."),
    spec: list[str] = typer.Option(["W16A16"], help="Spec(s) to account for; repeat for a table."),
    batch: int = typer.Option(1, min=1, help="Batch size of the KV cache."),
    seqlen: int = typer.Option(2048, min=1, help="Tokens per sequence in the KV cache."),
    as_json: bool = JSON,
):
    """Weight and KV-cache bytes from the model configuration alone (no weights are read)."""
    from qtool.metrics.memory import config_memory

    rows = config_memory(model, spec, batch, seqlen)
    table = Table(title=f"qtool memory {model} (batch {batch}, {seqlen} tokens)")
    for col in ("spec", "weights GiB", "KV cache GiB", "total GiB"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["spec"], *(f"{r[k] / 2**30:.1f}" for k in ("weight_bytes", "kv_bytes", "total_bytes")))
    _finish({"model": model, "rows": rows}, as_json, table)


@app.command("eval")
def eval_(
    model: str = typer.Argument(..., help="Model id, model directory or stage directory."),
    spec: Optional[str] = typer.Option(
        None,
        help="Quantization spec, e.g. W4A16-g128, W4A4 (default: the stage's own; W16A16 for a float model). Weights use the stage's learned scales when it has them, RTN otherwise.",
    ),
    data: str = typer.Option("wikitext2-test", help="wikitext2-test, wikitext2-valid, or a .txt/.jsonl file."),
    seqlen: int = typer.Option(2048, min=2, help="Tokens per evaluation window."),
    windows: Optional[int] = typer.Option(None, min=1, help="Evaluate only the first N windows (default: all)."),
    text_field: str = typer.Option("text", help="Field holding the text in a .jsonl file."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
    mem_batch: int = typer.Option(1, min=1, help="Batch size for the KV-cache memory accounting."),
    mem_seqlen: int = typer.Option(2048, min=1, help="Sequence length for the KV-cache memory accounting."),
    tasks: Optional[str] = typer.Option(
        None, help="Zero-shot tasks, comma-separated: piqa,arc_easy,arc_challenge,winogrande,boolq,lambada_openai."
    ),
    limit: Optional[int] = typer.Option(None, min=1, help="Score only the first N documents of each task."),
    task_data: Optional[str] = typer.Option(None, help="Replace bundled task files: TASK=PATH[,TASK=PATH]."),
    ppl: Optional[bool] = typer.Option(None, "--ppl/--no-ppl", help="Perplexity too (default: only when no --tasks)."),
    device: str = DEVICE,
    batch_size: int = BATCH,
    as_json: bool = JSON,
):
    """Perplexity (WikiText-2 protocol), zero-shot accuracy (lm-evaluation-harness 0.4 rules) and
    weight / KV-cache memory of a model or stage."""
    from qtool.core.progress import console
    from qtool.metrics.tasks import results_table
    from qtool.stages.eval import EvalParams, evaluate

    params = EvalParams(
        model, spec, data, seqlen, windows, text_field, dtype, mem_batch, mem_seqlen, tasks, limit, task_data, ppl
    )
    result = evaluate(params, device, batch_size)
    mem = result["memory"]
    rows = {"model": result["model"], "spec": result["spec"]}
    if result["ppl"] is not None:
        rows.update({"perplexity": result["ppl"], "windows x seqlen": f"{result['windows']} x {result['seqlen']}"})
    rows.update(
        {
            "weights": f"{mem['weight_bytes'] / 2**20:.1f} MiB ({mem['weight_bits_per_param']:.3f} bits/param in block linears)",
            f"KV cache (batch {mem['batch']}, {mem['seqlen']} tokens)": f"{mem['kv_bytes'] / 2**20:.1f} MiB",
            "time": f"{result['seconds']} s on {result['device']}",
        }
    )
    if "tasks" in result:
        console.print(results_table(result["tasks"], title=f"zero-shot, {result['spec']}"))
    _finish(result, as_json, _kv_table("qtool eval", rows))


@app.command()
def pack(
    model: str = typer.Argument(
        ..., help="A quantized stage (train-blockap, tune-e2e, reorder), or any model with --spec (RTN)."
    ),
    out: str = typer.Option(..., "--out", "-o", help="Directory to write."),
    spec: Optional[str] = typer.Option(
        None, help="Spec to pack (default: the stage's own), e.g. W4A16-g128, W4A4, W4A4KV4."
    ),
    format: str = typer.Option(
        "qtool", "--format", help="qtool (kernels, `qtool.load`), gptq or compressed-tensors (weight-only exports)."
    ),
    dtype: str = typer.Option(
        "float32", help="dtype of the tensors that stay float (embeddings, norms, head): float32, float16, bfloat16."
    ),
    layout: str = typer.Option(
        "auto",
        help="Kernel layout: auto (weight-only wherever it holds the width), wonly, u8 (integer tensor cores), planes (bit-plane GEMM).",
    ),
    as_json: bool = JSON,
):
    """Pack a quantized stage into the kernels' layout (or export GPTQ / compressed-tensors)."""
    from qtool.stages.pack import PackParams
    from qtool.stages.pack import pack as run_stage

    result = run_stage(PackParams(model, out, spec=spec, format=format, dtype=dtype, layout=layout))
    keys = ("out", "spec", "layout", "format", "disk_bytes", "bits_per_weight", "bits_per_weight_gpu", "seconds")
    _finish(result, as_json, _kv_table("qtool pack", {k: result[k] for k in keys if k in result}))


@app.command()
def generate(
    model: str = typer.Argument(..., help="Model id, model directory, stage or packed checkpoint."),
    prompt: str = typer.Option(..., help="Text to continue."),
    max_new_tokens: int = typer.Option(64, min=1, help="Tokens to generate (greedy)."),
    dtype: str = typer.Option("auto", help="auto (float16 on a GPU, float32 on the CPU), float32, float16, bfloat16."),
    device: str = DEVICE,
    as_json: bool = JSON,
):
    """Greedy generation through qtool's Decoder (llama, mistral, qwen2; transformers' generate otherwise)."""
    from qtool.runtime.generate import generate_text

    result = generate_text(model, prompt, max_new_tokens, device, dtype)
    rows = {
        "text": result["text"],
        "tokens": result["new_tokens"],
        "speed": f"{result['tokens_per_s']} tokens/s ({result['runtime']} on {result['device']})",
    }
    _finish(result, as_json, _kv_table("qtool generate", rows))


@app.command("train-blockap")
def train_blockap(
    model: str = typer.Argument(..., help="Model id, model directory or stage directory."),
    out: str = typer.Option(..., "--out", "-o", help="Stage directory to write."),
    preset: str = typer.Option("omniquant", help="omniquant, efficientqat or abq."),
    spec: str = typer.Option("W4A16-g128", help="Target spec, e.g. W4A16-g128, W2A16-g64, W4A4, W2*A8-g128."),
    data: str = typer.Option("wikitext2-valid", help="wikitext2-valid, wikitext2-test, or a .txt/.jsonl file."),
    samples: int = typer.Option(128, min=1, help="Number of calibration windows."),
    seqlen: int = typer.Option(2048, min=2, help="Tokens per calibration window."),
    seed: int = typer.Option(0, help="Seed of the window sampling and the batch order."),
    epochs: int = typer.Option(2, min=1, help="Passes over the calibration windows per block."),
    train_batch: int = typer.Option(1, "--batch-size", min=1, help="Windows per training step (and per forward pass)."),
    lr_let: Optional[float] = typer.Option(None, help="LET learning rate (preset default)."),
    lr_lwc: Optional[float] = typer.Option(None, help="Clipping (LWC) learning rate (preset default)."),
    lr_weight: Optional[float] = typer.Option(None, help="Weight learning rate, efficientqat (preset default)."),
    lr_qparams: Optional[float] = typer.Option(None, help="Scale/zero learning rate, efficientqat (preset default)."),
    lr_comp: Optional[float] = typer.Option(None, help="Compensation-vector learning rate, abq (preset default)."),
    cosine: Optional[bool] = typer.Option(
        None, "--cosine/--no-cosine", help="Cosine learning-rate schedule (preset default)."
    ),
    alpha: float = typer.Option(0.5, help="LET migration strength."),
    text_field: str = typer.Option("text", help="Field holding the text in a .jsonl file."),
    device: str = DEVICE,
    as_json: bool = JSON,
):
    """Block-wise training of the quantized model; saves folded weights and learned scales/zeros."""
    from qtool.stages.train_blockap import BlockAPParams
    from qtool.stages.train_blockap import train_blockap as run_stage

    params = BlockAPParams(
        model,
        out,
        data=data,
        samples=samples,
        seqlen=seqlen,
        seed=seed,
        text_field=text_field,
        preset=preset,
        spec=spec,
        epochs=epochs,
        batch=train_batch,
        lr_let=lr_let,
        lr_lwc=lr_lwc,
        lr_weight=lr_weight,
        lr_qparams=lr_qparams,
        lr_comp=lr_comp,
        cosine=cosine,
        alpha=alpha,
    )
    _finish(run_stage(params, device, train_batch), as_json)


@app.command()
def run(
    recipe: str = typer.Argument(..., help="A recipe YAML file (see recipes/)."),
    device: str = DEVICE,
    as_json: bool = JSON,
):
    """Run the stages a recipe lists, in order; stages already complete for the same inputs are skipped."""
    from qtool.recipe import load_recipe, run_recipe

    results = run_recipe(load_recipe(recipe), device)
    table = Table(title=f"qtool run {recipe}")
    for col in ("step", "stage", "result"):
        table.add_column(col)
    for step, res in enumerate(results):
        if res.get("ppl") is not None:
            summary = f"ppl {res['ppl']:.3f} ({res['spec']}, {res['windows']} x {res['seqlen']})"
        elif "tasks" in res:
            summary = ", ".join(f"{t} acc {m['acc']:.4f}" for t, m in res["tasks"].items())
        else:
            summary = res.get("out", "")
        table.add_row(str(step), res["stage"] + (" (skipped)" if res.get("skipped") else ""), summary)
    _finish({"recipe": recipe, "steps": results}, as_json, table)


def _mount_subapps() -> None:
    from qtool.bench.cli import app as bench_app

    app.add_typer(bench_app, name="bench")


_mount_subapps()


def main() -> None:
    _quiet_libraries()
    try:
        app()
    except QtoolError as exc:
        from qtool.core.progress import console

        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
