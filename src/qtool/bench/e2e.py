"""`qtool bench e2e`: whole-model prefill latency, decode throughput and peak GPU memory of packed
models beside the same model in fp16, in one run.

Kernels: the packed linears run in the layout kernels.chooser picks for the spec (`layout` column) and
with the kernels it picks per shape: from the table `qtool bench kernels --tune` wrote where there is
one (`kernel_table` column), else its default rule.
Models: SmolLM2 with its real weights, and LLaMA-2-7B / 70B shapes (configs/) with random weights and
fewer blocks (`--layers`), as the table states. Every variant is built afresh on the GPU from the
same seed (the same fp16 weights), packed by RTN (`pack_model`) and reduced to kernel form.
Runtimes: `hf` is the transformers forward with its DynamicCache; `qtool` is qtool.runtime.decoder.Decoder
(static cache, fused q|k|v and gate|up, compiled small ops). fp16 always runs under both, so every
packed row has a speed-up against fp16 in its own runtime and against fp16 in transformers.
Timing: CUDA events, warm-up, median. Prefill: one forward of batch 1 x `--prefill` tokens. Decode:
one token per sequence for batch 1, 8 and 32 after `--context` cached tokens, captured as a CUDA
graph and replayed (host launch overhead would otherwise hide the kernels at batch 1), so tokens/s
= batch / step time.
"""

from __future__ import annotations

import csv
import gc
import json
import statistics
from pathlib import Path

import torch

from qtool.core.errors import QtoolError
from qtool.core.paths import bundled_dir
from qtool.kernels import chooser

CONFIG_DIR = bundled_dir("configs")
MODELS = {"smollm2": None, "llama2-7b": "llama-2-7b.json", "llama2-70b": "llama-2-70b.json"}


def build_fp16(name: str, layers: int | None, device) -> torch.nn.Module:
    """The fp16 model on `device`: real SmolLM2 weights, or a random-weight LLaMA shape."""
    from transformers import AutoModelForCausalLM

    from qtool.metrics.memory import load_config

    if name == "smollm2":
        from qtool.models.loading import load_model, resolve_model

        return load_model(resolve_model("smollm2-135m"), dtype=torch.float16, device=str(device))
    if name not in MODELS:
        raise QtoolError(f"unknown bench model {name!r}: use {', '.join(MODELS)}")
    config = load_config(str(CONFIG_DIR / MODELS[name]))
    if layers:
        config.num_hidden_layers = layers
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16, attn_implementation="sdpa")
    return model.eval()


def _time(fn, reps: int, warmup: int = 3) -> float:
    """Median seconds of `fn` over `reps` runs, CUDA events, after `warmup` runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


@torch.no_grad()
def prefill_seconds(model, tokens: int, reps: int, decoder=None) -> float:
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device="cuda")
    if decoder is not None:
        decoder.resize(1, tokens)
        return _time(lambda: decoder.forward(ids, 0), reps)
    return _time(lambda: model(ids, use_cache=False, logits_to_keep=1), reps)


def _replayed(step, reps: int) -> tuple[float, str]:
    """Seconds of `step` replayed as a CUDA graph where capture works, else run eagerly (the second
    value says which)."""
    from qtool.runtime.decoder import capture_graph

    try:
        graph, _ = capture_graph(step)
        return _time(graph.replay, reps), "graph"
    except Exception as exc:  # capture refused (a host sync somewhere): time eagerly, and say so
        print(f"CUDA graph capture failed ({type(exc).__name__}: {str(exc)[:120]}); timing eagerly")
        torch.cuda.synchronize()
        return _time(step, reps), "eager"


@torch.no_grad()
def decode_step_seconds(model, batch: int, context: int, reps: int, decoder=None) -> tuple[float, str]:
    """Seconds of one decode step (batch new tokens) after `context` cached tokens. transformers:
    its DynamicCache, whose append copies the cache once per step, as plain HF decoding does. qtool:
    the Decoder's static cache, the step writing position `context` each replay."""
    prompt = torch.randint(0, model.config.vocab_size, (batch, context), device="cuda")
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device="cuda")
    if decoder is not None:
        decoder.resize(batch, context + 1)
        decoder.forward(prompt, 0)
        start = torch.tensor(context, device="cuda")
        return _replayed(lambda: decoder.forward(ids, start), reps)
    from transformers import DynamicCache

    cache = DynamicCache()
    model(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
    prefix = [(layer.keys, layer.values) for layer in cache.layers]

    def step():
        for layer, (k, v) in zip(cache.layers, prefix):  # always append to the same `context` tokens
            layer.keys, layer.values = k, v
        return model(ids, past_key_values=cache, use_cache=True)

    return _replayed(step, reps)


def packed_variant(name: str, layers: int | None, spec_name: str, device):
    """The model built afresh on `device` (same seed, so the same weights for every variant) with
    its block linears packed for `spec_name` by RTN, in kernel form; fp16 leaves it as is."""
    from qtool.core.spec import parse_spec
    from qtool.models.adapters import adapter_for
    from qtool.runtime.packed_model import pack_model, to_kernel_form

    model = build_fp16(name, layers, device)
    if spec_name != "fp16":
        pack_model(model, adapter_for(model.config), parse_spec(spec_name))
        to_kernel_form(model)
    gc.collect()
    torch.cuda.empty_cache()
    return model


RUNTIMES = ("hf", "qtool")


def run_e2e(
    models: list[str],
    specs: list[str],
    layers: dict[str, int | None],
    batches: list[int],
    prefill: int,
    context: int,
    reps: int,
    out_dir: Path,
    runtimes: list[str] = ("qtool",),
) -> list[dict]:
    if not torch.cuda.is_available():
        raise QtoolError("qtool bench e2e needs a CUDA GPU (none visible)")
    bad = [r for r in runtimes if r not in RUNTIMES]
    if bad:
        raise QtoolError(f"unknown runtime {bad[0]!r}: use {', '.join(RUNTIMES)}")
    from qtool.core.spec import parse_spec
    from qtool.metrics.memory import memory_report
    from qtool.models.adapters import adapter_for
    from qtool.runtime.decoder import Decoder
    from qtool.runtime.packed_model import packed_bytes

    out_dir.mkdir(parents=True, exist_ok=True)
    kernel_table = str(chooser.table_path()) if chooser.load_table() is not None else "defaults"
    rows = []
    variants = [("fp16", r) for r in RUNTIMES] + [(s, r) for s in specs for r in RUNTIMES if r in runtimes]
    for name in models:
        for spec, runtime in variants:
            try:
                model = packed_variant(name, layers.get(name), spec, "cuda")
            except QtoolError as exc:
                print(f"{name} {spec}: skipped ({exc})")
                continue
            row = {
                "model": name,
                "layers": model.config.num_hidden_layers,
                "spec": spec,
                "runtime": runtime,
                "layout": "" if spec == "fp16" else chooser.choose_layout(parse_spec(spec)),
                "kernel_table": kernel_table,
                "weight_bytes": torch.cuda.memory_allocated(),
            }
            if spec != "fp16":  # packed linears' bytes against the bits-per-weight arithmetic of the spec
                report = memory_report(model.config, adapter_for(model.config), parse_spec(spec))
                row["bits_per_weight"] = round(8 * packed_bytes(model)["linear_bytes"] / report.linear_params, 4)
                row["bits_per_weight_arith"] = round(report.weight_bits_per_param, 4)
            torch.cuda.reset_peak_memory_stats()
            decoder = Decoder(model, 1, prefill) if runtime == "qtool" else None
            row["prefill_ms"] = round(prefill_seconds(model, prefill, reps, decoder) * 1e3, 3)
            for b in batches:
                seconds, how = decode_step_seconds(model, b, context, reps, decoder)
                row[f"decode_tok_s_b{b}"] = round(b / seconds, 1)
                row["decode_timing"] = how
            row["peak_bytes"] = torch.cuda.max_memory_allocated()
            rows.append(row)
            print(json.dumps(row))
            del model, decoder
            gc.collect()
            torch.cuda.empty_cache()
    _with_speedups(rows, batches)
    _write(rows, out_dir)
    return rows


def _with_speedups(rows: list[dict], batches: list[int]) -> None:
    """Speed-ups against fp16 in the row's own runtime, and against fp16 in transformers (`_vs_hf`)."""
    base = {(r["model"], r["runtime"]): r for r in rows if r["spec"] == "fp16"}
    for r in rows:
        for suffix, ref in (("", base.get((r["model"], r["runtime"]))), ("_vs_hf", base.get((r["model"], "hf")))):
            if ref is None:
                continue
            r[f"prefill_speedup{suffix}"] = round(ref["prefill_ms"] / r["prefill_ms"], 3)
            for b in batches:
                r[f"decode_speedup{suffix}_b{b}"] = round(r[f"decode_tok_s_b{b}"] / ref[f"decode_tok_s_b{b}"], 3)


def _write(rows: list[dict], out_dir: Path) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with (out_dir / "e2e_bench.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping the chart")
        return
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, name in zip(axes[0], models):
        sub = [r for r in rows if r["model"] == name]
        cols = [k for k in sub[0] if k.startswith("decode_tok_s_b")]
        width = 0.8 / len(sub)
        for i, r in enumerate(sub):
            ax.bar(
                [j + i * width for j in range(len(cols))],
                [r[c] for c in cols],
                width,
                label=f"{r['spec']} ({r['runtime']})",
            )
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cols))], [c.replace("decode_tok_s_", "") for c in cols])
        ax.set_title(f"{name} ({sub[0]['layers']} blocks)")
        ax.set_ylabel("decode tokens/s")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "e2e_bench.png", dpi=120)
