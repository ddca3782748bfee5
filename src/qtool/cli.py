"""The `qtool` command line: one command per stage, made from the stage's parameter dataclass, plus
`memory`, `generate`, `run` (recipes) and `bench`; each parses options, calls one function, prints a summary."""

from __future__ import annotations

import inspect
import json
import os
import sys

import typer
from rich.table import Table

from qtool.core.errors import QtoolError, save_trace

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Quantize LLMs to low bit-widths (RPTQ, OmniQuant, EfficientQAT, ABQ-LLM) and run them.",
)

DEVICE = typer.Option("auto", help="Compute device: auto, cpu, cuda, cuda:N.")
JSON = typer.Option(False, "--json", help="Print one JSON object as the last line.")
KEYWORD = inspect.Parameter.KEYWORD_ONLY


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _finish(result: dict, as_json: bool, *tables: Table) -> None:
    from qtool.core import distributed
    from qtool.core.progress import console

    for table in tables:
        console.print(table)
    if as_json and distributed.is_writer():  # under torchrun: rank 0 alone answers
        print(json.dumps(result, default=str))


def _kv_table(title: str, rows: dict) -> Table:
    table = Table(title=title, show_header=False)
    for key, value in rows.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    return table


def _stage_command(stage):
    """A command whose options are the stage's parameter fields (help, defaults and allowed values
    from their `param` declarations), which builds the parameters, runs the stage and prints its
    result."""
    from qtool.stages.base import field_types, flag_name, parameter_fields, plain_type, range_text

    types_ = field_types(stage.params)
    signature = [
        inspect.Parameter("model", KEYWORD, annotation=str, default=typer.Argument(..., help=stage.model_help))
    ]
    if "out" in types_:
        out = typer.Option(..., "--out", "-o", help="Stage directory to write.")
        signature.append(inspect.Parameter("out", KEYWORD, annotation=str, default=out))
    for f in parameter_fields(stage.params):
        if not f.metadata.get("cli", True):
            continue
        allowed = range_text(f)
        help_ = f.metadata.get("help", "") + (f" [{allowed}]" if allowed else "")
        flag = flag_name(f.name)
        if types_[f.name] is bool:
            flag += "/--no-" + flag[2:]
        option = typer.Option(f.default, *(f.metadata.get("flags") or (flag,)), help=help_)
        signature.append(inspect.Parameter(f.name, KEYWORD, annotation=plain_type(types_[f.name]), default=option))
    signature.append(inspect.Parameter("as_json", KEYWORD, annotation=bool, default=JSON))

    def command(as_json: bool, **values):
        result = stage(stage.params(**values))
        rows = result.rows()
        _finish(
            result.as_dict(), as_json, *result.tables(), *([_kv_table(f"qtool {stage.name}", rows)] if rows else [])
        )

    command.__signature__ = inspect.Signature(signature)
    command.__doc__ = stage.help
    command.__name__ = stage.name.replace("-", "_")
    return command


def _mount_stages() -> None:
    from qtool.stages import STAGES

    for name, stage in STAGES.items():
        app.command(name)(_stage_command(stage))


_mount_stages()


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
        elif res.get("tasks"):
            summary = ", ".join(f"{t} acc {m['acc']:.4f}" for t, m in res["tasks"].items())
        else:
            summary = res.get("out", "")
        table.add_row(str(step), res["stage"] + (" (skipped)" if res.get("skipped") else ""), summary)
    _finish({"recipe": recipe, "steps": results}, as_json, table)


def _mount_bench() -> None:
    from qtool.bench.cli import app as bench_app

    app.add_typer(bench_app, name="bench")


_mount_bench()


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
    except Exception as exc:  # a bug, not bad input: one line, the trace kept for the report
        from qtool.core.progress import console

        where = save_trace(f"qtool {' '.join(sys.argv[1:])}")
        console.print(
            f"[red]error:[/red] unexpected {type(exc).__name__}: {exc} (a bug in qtool; full trace in {where})",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
