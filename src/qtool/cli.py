"""The `qtool` command line: thin commands that parse options, call one stage, print a summary."""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

import typer
from rich.table import Table

from qtool.errors import QtoolError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Quantize LLMs to low bit-widths (RPTQ, OmniQuant, EfficientQAT, ABQ-LLM) and run them.")

DEVICE = typer.Option("auto", help="Compute device: auto, cpu, cuda, cuda:N.")
JSON = typer.Option(False, "--json", help="Print one JSON object as the last line.")
BATCH = typer.Option(1, "--batch-size", min=1, help="Windows per forward pass.")


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _finish(result: dict, as_json: bool, table: Table | None = None) -> None:
    from qtool.runtime import console

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
    from qtool.calibrate import CalibrateParams
    from qtool.calibrate import calibrate as run

    result = run(CalibrateParams(model, out, data, samples, seqlen, seed, text_field), device, batch_size)
    _finish(result, as_json)


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
    from qtool.reorder import ReorderParams
    from qtool.reorder import reorder as run

    _finish(run(ReorderParams(model, out, clusters, head_clusters, seed)), as_json)


@app.command()
def memory(
    model: str = typer.Argument(..., help="A config.json file (see configs/), model id or model directory."),
    spec: list[str] = typer.Option(["W16A16"], help="Spec(s) to account for; repeat for a table."),
    batch: int = typer.Option(1, min=1, help="Batch size of the KV cache."),
    seqlen: int = typer.Option(2048, min=1, help="Tokens per sequence in the KV cache."),
    as_json: bool = JSON,
):
    """Weight and KV-cache bytes from the model configuration alone (no weights are read)."""
    from qtool.eval.memory import config_memory

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
    spec: str = typer.Option("W16A16", help="Fake-quantize on the fly with this spec (RTN), e.g. W4A16-g128, W4A4."),
    data: str = typer.Option("wikitext2-test", help="wikitext2-test, wikitext2-valid, or a .txt/.jsonl file."),
    seqlen: int = typer.Option(2048, min=2, help="Tokens per evaluation window."),
    windows: Optional[int] = typer.Option(None, min=1, help="Evaluate only the first N windows (default: all)."),
    text_field: str = typer.Option("text", help="Field holding the text in a .jsonl file."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
    mem_batch: int = typer.Option(1, min=1, help="Batch size for the KV-cache memory accounting."),
    mem_seqlen: int = typer.Option(2048, min=1, help="Sequence length for the KV-cache memory accounting."),
    device: str = DEVICE,
    batch_size: int = BATCH,
    as_json: bool = JSON,
):
    """Perplexity (WikiText-2 protocol) and weight / KV-cache memory of a model or stage."""
    from qtool.eval.run import EvalParams, evaluate

    result = evaluate(EvalParams(model, spec, data, seqlen, windows, text_field, dtype, mem_batch, mem_seqlen), device, batch_size)
    mem = result["memory"]
    rows = {
        "model": result["model"], "spec": result["spec"], "perplexity": result["ppl"],
        "windows x seqlen": f"{result['windows']} x {result['seqlen']}",
        "weights": f"{mem['weight_bytes'] / 2**20:.1f} MiB ({mem['weight_bits_per_param']:.3f} bits/param in block linears)",
        f"KV cache (batch {mem['batch']}, {mem['seqlen']} tokens)": f"{mem['kv_bytes'] / 2**20:.1f} MiB",
        "time": f"{result['seconds']} s on {result['device']}",
    }
    _finish(result, as_json, _kv_table("qtool eval", rows))


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
        summary = f"ppl {res['ppl']:.3f} ({res['spec']}, {res['windows']} x {res['seqlen']})" if "ppl" in res else res.get("out", "")
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
        from qtool.runtime import console

        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
