"""Kernel benchmark: time every path beside torch fp16 matmul and torch._int_mm in the same run.

A path 'wPaQ' runs what a packed linear of that spec runs: the layout `qtool pack --layout auto` writes
and, at each M, the kernel kernels.chooser picks (as kernels.ops admits it); 'wPaQ:LAYOUT' takes another
layout (wonly, u8, planes; 'bitplane' is planes), 'wPaQ:KERNEL' forces one of chooser.PATHS. With
activation bits (Q < 16) the time includes quantizing x, as the runtime does it (in the weight-only GEMV
or before the u8 / bit-plane GEMM). `--tune` also times every kernel of every layout that holds the bit
widths and writes the chooser's table (kernels.chooser.write_table).

Timing: CUDA events around a batch of back-to-back launches while a preceding sleep kernel keeps the
queue full (so host launch overhead is not measured), warm-up first, median over batches of the per-call
time; weights are rotated among copies totalling > 2x L2 so small-M runs stream from HBM. Roofline:
weight bytes / measured D2D copy bandwidth for M <= 16; for larger M the dense tensor peak of the
instruction used (H100 figures below). Run as `qtool bench kernels` (or `python -m qtool.bench kernels`).
"""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from qtool.core.errors import QtoolError
from qtool.kernels import chooser

DEFAULT_SHAPES = ("4096x4096", "11008x4096", "4096x11008", "8192x8192", "28672x8192")
DEFAULT_M = (1, 4, 16, 64, 256, 1024, 4096)
# torch's own kernels, timed beside qtool's: bf16 matmul, tinygemm's W4 g128 (torch._weight_int4pack_mm,
# bf16 x), fp8 e4m3 (torch._scaled_mm, x cast per call as a runtime would), int8 (torch._int_mm)
PEERS = ("fp16", "bf16", "tinygemm", "fp8", "int_mm")
DEFAULT_PATHS = ("fp16", "int_mm", "w4a16", "w2a16", "w3a16", "w8a16", "w2a8", "w2a2", "w4a4")
DEFAULT_GROUP = 128
TENSOR_PEAK = {"f16": 655e12, "s8": 1320e12, "b1": 10200e12}  # measured H100 mma.sync rates (ops/s)
L2_BYTES = 50 << 20
SMALL_M = 16


@dataclass
class Case:
    """One benchmarked path at one shape: the callable to time and what it moves / computes."""

    path: str
    layout: str  # '' for the torch baselines
    impl: str
    run: object
    weight_bytes: int
    peak: float  # tensor ops/s bound for large M
    ops_factor: float = 1.0  # tensor ops per MAC for the peak (p*q binary ops for bit-planes)


def parse_shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        try:
            n, k = (int(v) for v in item.lower().split("x"))
        except ValueError as e:
            raise QtoolError(f"bad shape {item!r}: write N x K as e.g. 4096x11008") from e
        out.append((n, k))
    return out


def parse_path(path: str) -> tuple[int, int, str | None, str | None]:
    """(wbits, abits, layout, forced kernel): 'w4a16' -> (4, 16, 'wonly', None) (the layout pack's
    auto writes), 'w2a8:u8' -> (2, 8, 'u8', None), 'w2a2:bitplane' -> (2, 2, 'planes', None),
    'w4a16:mma' -> (4, 16, 'wonly', 'mma'); layout None where no kernel holds the bit widths."""
    name, _, sel = path.partition(":")
    try:
        w, a = name.removeprefix("w").split("a") if name.startswith("w") else ("", "")
        wbits, abits = int(w), int(a)
    except ValueError as e:
        raise QtoolError(
            f"bad path {path!r}: use a torch peer ({', '.join(PEERS)}) or wPaQ such as w4a16, w2a8, w2a2:bitplane"
        ) from e
    if abits != 16 and not 1 <= abits <= 8:
        raise QtoolError(f"bad path {path!r}: activation bits are 16 (float) or 1..8")
    sel = "planes" if sel == "bitplane" else sel
    if not sel:
        return wbits, abits, chooser.auto_layout(wbits, abits), None
    if sel in chooser.LAYOUTS:
        return wbits, abits, sel, None
    if sel in chooser.LAYOUT_OF:
        return wbits, abits, chooser.LAYOUT_OF[sel], sel
    kernels = ", ".join(p for paths in chooser.PATHS.values() for p in paths)
    raise QtoolError(
        f"bad path {path!r}: after ':' name a layout ({', '.join(chooser.LAYOUTS)}) or a kernel ({kernels})"
    )


def time_us(fn, reps: int = 30, warmup: int = 3, batches: int = 3) -> float:
    """Per-call time of `reps` back-to-back launches between two events (median over batches): per-launch
    events add ~2 us to a 5 us kernel. A sleep kernel queued before the start event keeps the host's
    launch overhead out; batches slower than 1 ms per call are not repeated (their error is small)."""
    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize()
    per_call, i = [], 0
    for _ in range(batches):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(20_000_000)  # ~10 ms of queue ahead of the timed launches
        start.record()
        for _ in range(reps):
            fn(i)
            i += 1
        end.record()
        torch.cuda.synchronize()
        per_call.append(start.elapsed_time(end) * 1e3 / reps)
        if per_call[-1] > 1000:
            break
    return statistics.median(per_call)


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write)."""
    a = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    us = time_us(lambda i: b.copy_(a), reps=20)
    return 2 * a.numel() / (us * 1e-6)


def _copies(nbytes: int) -> int:
    return max(1, min(8, math.ceil(2 * L2_BYTES / max(nbytes, 1))))


def _random_codes(n, k, bits, gen_dev):
    return torch.randint(0, 2**bits, (n, k), device=gen_dev)


def _packed_copies(pack) -> list:
    """pack() called as often as needed for copies totalling > 2x L2 (small-M runs stream from HBM)."""
    ws = [pack()]
    return ws + [pack() for _ in range(_copies(ws[0].nbytes) - 1)]


def build_case(path: str, n: int, k: int, m: int, x: torch.Tensor, group: int | None = DEFAULT_GROUP) -> Case | None:
    """A Case for `path` at (M, N, K), weights in groups of `group` along K (None: per channel), or
    None where the path does not apply (_int_mm at M <= 16, bit widths no kernel of the layout holds,
    a forced kernel that cannot run M rows)."""
    from qtool import kernels as qk

    dev = x.device
    if path in ("fp16", "bf16"):
        dtype = torch.float16 if path == "fp16" else torch.bfloat16
        xf = x.to(dtype)
        w = [torch.randn(n, k, device=dev, dtype=dtype) for _ in range(_copies(2 * n * k))]
        return Case(path, "", "torch.matmul", lambda i: xf @ w[i % len(w)].T, 2 * n * k, TENSOR_PEAK["f16"])
    if path == "int_mm":
        if m <= SMALL_M or m % 8 or k % 8 or n % 8:
            return None
        xi = torch.randint(-128, 127, (m, k), dtype=torch.int8, device=dev)
        # weights [N, K] row-major, passed transposed: cuBLASLt's fast int8 kernels need B column-major
        w = [torch.randint(-128, 127, (n, k), dtype=torch.int8, device=dev) for _ in range(_copies(n * k))]
        return Case(path, "", "torch._int_mm", lambda i: torch._int_mm(xi, w[i % len(w)].t()), n * k, TENSOR_PEAK["s8"])
    if path in PEERS:
        return _peer_case(path, n, k, m, x)
    wbits, abits, layout, forced = parse_path(path)
    if layout is None or not chooser.holds(layout, wbits, abits):
        return None
    groups = -(-k // (group or k))
    scales = torch.rand(n, groups, device=dev) * 0.01 + 0.001
    zeros = torch.randint(0, 2**wbits, (n, groups), device=dev).float()
    if layout == "wonly":
        a_bits = abits if abits < 16 else None  # quantized per token in the GEMV, as PackedLinear runs it
        ws = _packed_copies(lambda: qk.pack_wonly(_random_codes(n, k, wbits, dev), wbits, scales, zeros, group))
        impl = forced or qk.ops.w_only_impl(m, ws[0], a_bits)
        if (impl == "simt" and not qk.ops._simt_fits(ws[0], m)) or (impl == "mma" and m > qk.ops.GEMV_ROWS):
            return None

        def run(i):
            return qk.w_only_gemm(x, ws[i % len(ws)], impl=impl, a_bits=a_bits)

        return Case(path, layout, impl, run, ws[0].nbytes, TENSOR_PEAK["f16"])
    ws = _packed_copies(
        lambda: qk.pack_lowbit(_random_codes(n, k, wbits, dev), wbits, scales, zeros, group, None, layout)
    )
    impl = forced or qk.ops.lowbit_impl(m, ws[0], abits)
    if impl == "bitplane_gemv" and m > qk.ops.GEMV_ROWS:
        return None

    def run_lowbit(i):  # x quantized on every call, as PackedLinear runs it
        return qk.lowbit_linear(x, ws[i % len(ws)], abits, impl=impl)

    if layout == "planes":
        return Case(path, layout, impl, run_lowbit, ws[0].nbytes, TENSOR_PEAK["b1"], ops_factor=wbits * abits)
    return Case(path, layout, impl, run_lowbit, ws[0].nbytes, TENSOR_PEAK["s8"])


def _peer_case(path: str, n: int, k: int, m: int, x: torch.Tensor) -> Case | None:
    """tinygemm or fp8 at (M, N, K), or None where the kernel does not take the shape (printed)."""
    dev = x.device
    try:
        if path == "tinygemm":
            xb = x.bfloat16()

            def pack():
                q = torch.randint(0, 16, (n, k), dtype=torch.int32, device=dev)
                return torch._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)

            w = [pack() for _ in range(_copies(n * k // 2))]
            sz = torch.rand(k // 128, n, 2, device=dev, dtype=torch.bfloat16)
            return Case(
                path,
                "",
                "_weight_int4pack_mm",
                lambda i: torch._weight_int4pack_mm(xb, w[i % len(w)], 128, sz),
                n * k // 2,
                TENSOR_PEAK["f16"],
            )
        if m % 16:
            return None  # cuBLASLt's fp8 GEMM takes multiples of 16
        one = torch.ones((), device=dev)
        w = [torch.randn(n, k, device=dev).to(torch.float8_e4m3fn) for _ in range(_copies(n * k))]
        return Case(
            path,
            "",
            "_scaled_mm e4m3",
            lambda i: torch._scaled_mm(x.to(torch.float8_e4m3fn), w[i % len(w)].t(), one, one, out_dtype=torch.float16),
            n * k,
            TENSOR_PEAK["s8"],
        )
    except (RuntimeError, AttributeError, TypeError) as e:
        print(f"{path} skipped at {n}x{k} M={m}: {str(e).splitlines()[0][:120]}")
        return None


def tune_paths(paths: list[str]) -> list[str]:
    """Every kernel of every layout that holds each plain 'wPaQ' path's bit widths, as 'wPaQ:KERNEL'."""
    out = []
    for p in paths:
        if p.startswith("w") and ":" not in p:
            wbits, abits, _, _ = parse_path(p)
            out += [f"{p}:{kernel}" for layout in chooser.layouts_for(wbits, abits) for kernel in chooser.PATHS[layout]]
    return out


def run_bench(
    shapes, ms, paths, out_dir: Path, tune: bool = False, reps: int = 30, group: int | None = DEFAULT_GROUP
) -> dict:
    for p in paths:
        if p not in PEERS:
            parse_path(p)  # a bad path fails before any timing
    if not torch.cuda.is_available():
        raise QtoolError("kernel benchmarks need a CUDA GPU: run on the GPU machine")
    out_dir.mkdir(parents=True, exist_ok=True)
    bw = copy_bandwidth()
    rows, table = [], []
    csv_path = out_dir / "kernels_bench.csv"
    fields = ["n", "k", "m", "path", "layout", "impl", "us", "tops", "tbps", "roofline_pct", "x_fp16", "x_int_mm"]
    csv_file = csv_path.open("w", newline="")  # rows are flushed as measured, so a cut-off run keeps them
    writer = csv.DictWriter(csv_file, fieldnames=fields)
    writer.writeheader()
    for n, k in shapes:
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            base = {}
            todo = ["fp16", "int_mm", *paths, *(tune_paths(paths) if tune else [])]
            for path in dict.fromkeys(todo):
                case = build_case(path, n, k, m, x, group)
                if case is None:
                    continue
                us = time_us(case.run, reps=reps)
                macs = m * n * k
                small = m <= SMALL_M
                roof_us = (case.weight_bytes / bw if small else macs * 2 * case.ops_factor / case.peak) * 1e6
                if path in ("fp16", "int_mm"):
                    base[path] = us
                row = dict(
                    n=n,
                    k=k,
                    m=m,
                    path=path,
                    layout=case.layout,
                    impl=case.impl,
                    us=round(us, 2),
                    tops=round(2 * macs / us / 1e6, 2),
                    tbps=round(case.weight_bytes / us / 1e6, 3),
                    roofline_pct=round(100 * roof_us / us, 1),
                    x_fp16=round(base.get("fp16", float("nan")) / us, 2),
                    x_int_mm=round(base["int_mm"] / us, 2) if "int_mm" in base else "",
                )
                rows.append(row)
                writer.writerow(row)
                csv_file.flush()
                print(
                    f"{n}x{k} M={m:5d} {path:18s} {case.impl:16s} {us:10.1f} us  {row['tops']:8.1f} TOPS  "
                    f"{row['tbps']:6.3f} TB/s  {row['roofline_pct']:5.1f}% roof  {row['x_fp16']}x fp16",
                    flush=True,
                )
                if case.layout:
                    wb, ab, _, _ = parse_path(path)
                    g = chooser.group_key(group, k)
                    entry = dict(layout=case.layout, wbits=wb, abits=ab, group=g, m=m, n=n, k=k, path=case.impl)
                    table.append({**entry, "us": round(us, 2)})
                del case
            torch.cuda.empty_cache()
    csv_file.close()
    result = {
        "csv": str(csv_path),
        "png": plot(rows, out_dir / "kernels_bench.png"),
        "copy_tbps": round(bw / 1e12, 3),
        "rows": len(rows),
        "device": torch.cuda.get_device_name(),
    }
    if tune:
        result["table"] = str(chooser.write_table(table, torch.cuda.get_device_name()))
    # the rows' own ratios (baseline time / path time), so the summary cannot disagree with the CSV
    result["speedups"] = {
        f"{r['path']} {r['n']}x{r['k']} M={r['m']}": {b: r[b] for b in ("x_fp16", "x_int_mm") if r[b] != ""}
        for r in rows
        if r["path"] not in ("fp16", "int_mm") and r["m"] in (min(ms), max(ms))
    }
    return result


def plot(rows: list[dict], path: Path) -> str | None:
    """Speed-up over torch fp16 against M, one panel per shape; skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping the plot")
        return None
    shapes = list(dict.fromkeys((r["n"], r["k"]) for r in rows))
    if not shapes:
        return None
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
    for ax, (n, k) in zip(axes[0], shapes):
        for p in dict.fromkeys(r["path"] for r in rows):
            pts = [(r["m"], r["x_fp16"]) for r in rows if (r["n"], r["k"], r["path"]) == (n, k, p)]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=p)
        ax.set_xscale("log", base=2)
        ax.set_title(f"N x K = {n} x {k}")
        ax.set_xlabel("M")
        ax.set_ylabel("speed-up vs torch fp16")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return str(path)
