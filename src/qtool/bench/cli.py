"""`qtool bench` sub-commands (mounted by the main CLI)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from qtool.bench.kernels import (
    DEFAULT_M,
    DEFAULT_PATHS,
    DEFAULT_SHAPES,
    parse_shapes,
    run_bench,
)
from qtool.errors import QtoolError

app = typer.Typer(help="Benchmark qtool's GPU kernels against torch fp16 and torch._int_mm.", no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Keep `kernels` a named sub-command even while it is the only one."""


@app.command()
def kernels(
    shapes: str = typer.Option(",".join(DEFAULT_SHAPES), help="N x K list, e.g. 4096x11008,8192x8192"),
    m: str = typer.Option(",".join(map(str, DEFAULT_M)), help="token counts M, comma separated"),
    paths: str = typer.Option(",".join(DEFAULT_PATHS), help="fp16, int_mm, wPaQ (w4a16, w2a8, ...) optionally :bitplane or :u8"),
    out: Path = typer.Option(Path("bench_out"), help="directory for kernels_bench.csv and .png"),
    tune: bool = typer.Option(False, help="also time every implementation and write the chooser table"),
    reps: int = typer.Option(30, help="timed runs per case (median reported)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON summary object as the last line"),
) -> None:
    """Time the kernel paths at each shape and M; write CSV + PNG (and the tuned table with --tune)."""
    try:
        ms = [int(v) for v in m.split(",")]
        result = run_bench(parse_shapes(shapes), ms, [p for p in paths.split(",") if p], out, tune=tune, reps=reps)
    except (QtoolError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from e
    if as_json:
        typer.echo(json.dumps(result))
