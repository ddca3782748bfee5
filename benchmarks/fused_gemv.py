"""The weight-only SIMT GEMV with its fused decoder ops against the same ops unfused, per LLaMA-2-7B
linear at batch 1: the plain GEMV on a ready input, the fused GEMV (norm / SiLU gate / input
quantization / residual add inside it), and the unfused chain (the Decoder's compiled norm or gate
kernels with the quantization, the plain GEMV, a residual add). Each in a CUDA graph (as the Decoder
replays its step), CUDA events, warm-up, median of --reps, the weights rotated over enough copies to
exceed L2.

Usage (from the repository root):
    PYTHONPATH=src python3 benchmarks/fused_gemv.py --bits 2 --a-bits 8 --out benchmarks/results/fused_gemv_h100.jsonl
(--shapes decoder: o_proj and down_proj with their input quantization alone, no residual;
--warps P,F: warps per block of the plain and the fused GEMV, against ops.SIMT_WARPS)
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics

import torch

from qtool.kernels import ops, pack_wonly, w_only_gemm
from qtool.runtime.decoder import add_rms_norm, silu_gate

# (name, N, K, op in front: norm / gated / none, residual add after)
SHAPES = {
    "all": [
        ("qkv", 12288, 4096, "norm", False),
        ("o", 4096, 4096, "none", True),
        ("gate_up", 22016, 4096, "norm", False),
        ("down", 4096, 11008, "gated", True),
    ],
    "decoder": [("o", 4096, 4096, "none", False), ("down", 4096, 11008, "none", False)],
}
L2_BYTES = 50 << 20


def median_us(fn, reps: int, calls: int = 20) -> float:
    """GPU time per call of fn: a CUDA graph of `calls` calls (no host launch cost), replayed reps times."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    return statistics.median(times)


def measure(
    name: str, n: int, k: int, op: str, res: bool, bits: int, group: int, a_bits: int | None, reps: int
) -> dict:
    """plain / fused / unfused GPU time of one linear."""
    dev, dt = "cuda", torch.float16
    nbytes = n * k * bits // 8
    copies = max(2, -(-2 * L2_BYTES // nbytes))
    group = group or k  # 0: per output channel
    ws = [
        pack_wonly(
            torch.randint(0, 2**bits, (n, k), device=dev),
            bits,
            torch.rand(n, -(-k // group), device=dev) * 0.01,
            torch.full((n, -(-k // group)), 2.0 ** (bits - 1), device=dev),
            group,
        )
        for _ in range(copies)
    ]
    kin = 2 * k if op == "gated" else k
    x = torch.randn(1, kin, device=dev, dtype=dt)
    h = torch.randn(1, k, device=dev, dtype=dt)
    resid = torch.randn(1, n, device=dev, dtype=dt) if res else None
    norm = (torch.rand(k, device=dev, dtype=dt) + 0.5, 1e-5) if op == "norm" else None
    quant = None if a_bits is None else (a_bits, (k,))
    rotation = itertools.cycle(ws)

    def w():
        return next(rotation)

    xin = x[:, :k].contiguous()

    def plain():
        w_only_gemm(xin, w())

    def fused():
        w_only_gemm(x, w(), gated=op == "gated", norm=norm, a_bits=a_bits, residual=resid)

    def unfused():
        if op == "norm":
            xi, _ = add_rms_norm(x, h, norm[0], norm[1], None, quant)
        elif op == "gated":
            xi = silu_gate(x, quant)
        else:
            xi = x if quant is None else silu_gate(torch.cat([x, x], -1), quant)  # a quantizer kernel's cost
        y = w_only_gemm(xi, w())
        if resid is not None:
            y = resid + y

    return {
        "linear": name,
        "n": n,
        "k": k,
        "bits": bits,
        "a_bits": a_bits or 16,
        "op": op,
        "residual": res,
        "plain_us": round(median_us(plain, reps), 2),
        "fused_us": round(median_us(fused, reps), 2),
        "unfused_us": round(median_us(unfused, reps), 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--group", type=int, default=64, help="0: per output channel (W2A8)")
    ap.add_argument("--a-bits", type=int, default=8, help="activation bits (16: none)")
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="all")
    ap.add_argument("--warps", default=None, help="P,F: warps per block of the plain and the fused SIMT GEMV")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.warps:
        ops.SIMT_WARPS[False], ops.SIMT_WARPS[True] = (int(v) for v in args.warps.split(","))
    a_bits = args.a_bits if args.a_bits < 16 else None
    rows = []
    for name, n, k, op, res in SHAPES[args.shapes]:
        row = measure(name, n, k, op, res, args.bits, args.group, a_bits, args.reps)
        row["warps"] = [ops.SIMT_WARPS[False], ops.SIMT_WARPS[True]]
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
