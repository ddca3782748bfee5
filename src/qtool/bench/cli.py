"""`qtool bench` sub-commands (mounted by the main CLI; also `python -m qtool.bench`). This module
imports the benchmarks (bench.kernel_bench, bench.e2e); they never import it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from qtool.bench.kernel_bench import (
    DEFAULT_GROUP,
    DEFAULT_M,
    DEFAULT_PATHS,
    DEFAULT_SHAPES,
    parse_shapes,
    run_bench,
)
from qtool.core.errors import QtoolError

app = typer.Typer(help="Benchmark qtool's GPU kernels and packed models against torch fp16.", no_args_is_help=True)
DEFAULT_OUT = Path("bench_out")


@app.command()
def kernels(
    shapes: str = typer.Option(",".join(DEFAULT_SHAPES), help="N x K list, e.g. 4096x11008,8192x8192"),
    m: str = typer.Option(",".join(map(str, DEFAULT_M)), help="token counts M, comma separated"),
    paths: str = typer.Option(
        ",".join(DEFAULT_PATHS),
        help="torch peers (fp16, bf16, tinygemm, fp8, int_mm) and wPaQ (w4a16, w2a8, ...: the layout pack "
        "writes, the kernel the chooser picks), optionally :LAYOUT (wonly, u8, planes or bitplane) or "
        ":KERNEL (simt, mma, wgmma, dequant, u8_gemm, ...)",
    ),
    group: int = typer.Option(DEFAULT_GROUP, help="weight group size along K (0: per channel)"),
    out: Annotated[Path, typer.Option(help="directory for kernels_bench.csv and .png")] = DEFAULT_OUT,
    tune: bool = typer.Option(False, help="also time every kernel of every layout and write the chooser's table"),
    reps: int = typer.Option(30, help="timed runs per case (median reported)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON summary object as the last line"),
) -> None:
    """Time the kernel paths at each shape and M; write CSV + PNG (and the tuned table with --tune)."""
    try:
        ms = [int(v) for v in m.split(",")]
        todo = [p for p in paths.split(",") if p]
        result = run_bench(parse_shapes(shapes), ms, todo, out, tune=tune, reps=reps, group=group or None)
    except (QtoolError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from e
    if as_json:
        typer.echo(json.dumps(result))


@app.command()
def e2e(
    models: str = typer.Option(
        "smollm2,llama2-7b,llama2-70b", help="smollm2 (real weights), llama2-7b, llama2-70b (random weights)"
    ),
    specs: str = typer.Option("W4A16-g128,W2A16-g64,W2A8,W4A4", help="packed specs beside fp16, comma separated"),
    layers: str = typer.Option(
        "llama2-7b=8,llama2-70b=2", help="blocks per random-weight model: NAME=N,... (default depth otherwise)"
    ),
    batches: str = typer.Option("1,8,32", help="decode batch sizes"),
    prefill: int = typer.Option(2048, help="prefill tokens (batch 1)"),
    context: int = typer.Option(512, help="tokens already in the KV cache when decoding"),
    reps: int = typer.Option(20, help="timed runs per measurement (median reported)"),
    runtimes: str = typer.Option(
        "qtool", help="runtimes of the packed specs: qtool (Decoder), hf (transformers); fp16 runs under both"
    ),
    out: Annotated[Path, typer.Option(help="directory for e2e_bench.csv and .png")] = DEFAULT_OUT,
    as_json: bool = typer.Option(False, "--json", help="print the rows as one JSON list as the last line"),
) -> None:
    """Prefill latency, decode tokens/s and peak GPU memory of packed models beside fp16 (CSV + PNG)."""
    from qtool.bench.e2e import run_e2e

    try:
        depth = {k: int(v) for k, _, v in (item.partition("=") for item in layers.split(",") if item)}
        rows = run_e2e(
            [m for m in models.split(",") if m],
            [s for s in specs.split(",") if s],
            depth,
            [int(b) for b in batches.split(",")],
            prefill,
            context,
            reps,
            out,
            [r for r in runtimes.split(",") if r],
        )
    except (QtoolError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from e
    if as_json:
        typer.echo(json.dumps(rows))
