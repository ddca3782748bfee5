"""Weight-only GEMV variants on one GPU, in one run (< 120 s on an H100):

    PYTHONPATH=src python3 benchmarks/gemv_variants.py --out $OUT

At N x K in 4096x11008, 8192x8192, 28672x8192, 11008x4096 and M in 1, 4, 16, times torch fp16 matmul,
the tensor-core GEMV (w_only_gemm impl='mma'), the SIMT GEMV (impl='simt') and the dispatch (impl=None)
for W4 g128 and W2 g64, and W3 g128 at M = 1. Timing is qtool.bench.kernel_bench.time_us: warm-up, then
batches of back-to-back launches behind a sleep kernel between CUDA events, the median over batches
(BATCHES x REPS = 70 timed launches per case). Weights are rotated among copies totalling > 2x L2 so
they stream from HBM. Effective TB/s = (weight + scale bytes, or 2NK for fp16) / time; % copy = that
over a measured device-to-device copy (bytes read + written). Writes gemv_variants.csv to --out.
Packed weights are random 32-bit words (every pattern is a valid code set; the kernels' time does not
depend on the values) with valid fp16 scales and zero points.
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path

import torch

from qtool.bench.kernel_bench import L2_BYTES, copy_bandwidth, time_us
from qtool.kernels import ops
from qtool.kernels.layouts import WOnlyWeights, wonly_row_words

SHAPES = [(4096, 11008), (8192, 8192), (28672, 8192), (11008, 4096)]
MS = (1, 4, 16)
WEIGHTS = [(4, 128, MS), (2, 64, MS), (3, 128, (1,))]  # bits, group, M values
VARIANTS = [("mma", "mma"), ("simt", "simt"), ("dispatch", None)]  # label, w_only_gemm impl
REPS, BATCHES = 10, 7
TARGETS = {(4, 1): 3.3, (2, 1): 6.0, (2, 16): 1.0}  # speed-up over fp16 this work aims at (dispatch)


def _copies(nbytes: int) -> int:
    """Enough copies that consecutive launches never find their weights in L2 (> 2x its size)."""
    return max(2, math.ceil(2 * L2_BYTES / nbytes) + 1)


def random_wonly(n: int, k: int, bits: int, group: int) -> WOnlyWeights:
    rw, g = wonly_row_words(k, bits), -(-k // group)

    def words(cols):
        return torch.randint(-(2**31), 2**31 - 1, (n, cols), dtype=torch.int32, device="cuda")

    scales = (torch.rand(n, g, device="cuda") * 0.01 + 0.001).half()
    zeros = torch.randint(0, 2**bits, (n, g), dtype=torch.uint8, device="cuda")
    return WOnlyWeights(bits, n, k, group, words(rw), words(rw // 2) if bits == 3 else None, scales, zeros)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for gemv_variants.csv")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gemv_variants.py needs a CUDA GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    bw = copy_bandwidth()
    dev = torch.cuda.get_device_name()
    print(f"{dev}: device-to-device copy {bw / 1e12:.3f} TB/s (read + write)", flush=True)
    fields = [
        "n",
        "k",
        "m",
        "weights",
        "variant",
        "impl",
        "us",
        "bytes",
        "tbps",
        "pct_copy",
        "x_fp16",
        "copy_tbps",
        "device",
    ]
    rows = []
    with (args.out / "gemv_variants.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()

        def record(n, k, m, weights, variant, impl, us, nbytes, fp16_us):
            tbps = nbytes / us / 1e6
            row = {
                "n": n,
                "k": k,
                "m": m,
                "weights": weights,
                "variant": variant,
                "impl": impl,
                "us": round(us, 2),
                "bytes": nbytes,
                "tbps": round(tbps, 3),
                "pct_copy": round(100 * tbps / (bw / 1e12), 1),
                "x_fp16": round(fp16_us / us, 2),
                "copy_tbps": round(bw / 1e12, 3),
                "device": dev,
            }
            rows.append(row)
            writer.writerow(row)
            f.flush()  # a cut-off run keeps its rows
            print(
                f"{n:5d}x{k:<5d} M={m:2d} {weights:8s} {variant:8s} {impl:7s} {us:8.2f} us {row['tbps']:6.3f} TB/s "
                f"{row['pct_copy']:5.1f}% copy {row['x_fp16']:5.2f}x fp16",
                flush=True,
            )

        for n, k in SHAPES:
            xs = {m: torch.randn(m, k, device="cuda", dtype=torch.float16) for m in MS}
            ws = [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(_copies(2 * n * k))]
            fp16_us = {}
            for m in MS:
                fp16_us[m] = time_us(lambda i, x=xs[m], ws=ws: x @ ws[i % len(ws)].T, reps=REPS, batches=BATCHES)
                record(n, k, m, "fp16", "torch", "matmul", fp16_us[m], 2 * n * k, fp16_us[m])
            for bits, group, ms in WEIGHTS:
                w0 = random_wonly(n, k, bits, group)
                wq = [w0] + [random_wonly(n, k, bits, group) for _ in range(_copies(w0.nbytes) - 1)]
                for m in ms:
                    for label, impl in VARIANTS:
                        us = time_us(
                            lambda i, x=xs[m], wq=wq, impl=impl: ops.w_only_gemm(x, wq[i % len(wq)], impl=impl),
                            reps=REPS,
                            batches=BATCHES,
                        )
                        record(
                            n,
                            k,
                            m,
                            f"W{bits}g{group}",
                            label,
                            impl or ops.w_only_impl(m, w0),
                            us,
                            w0.nbytes,
                            fp16_us[m],
                        )
            torch.cuda.empty_cache()

    print(f"\n{len(rows)} rows in {time.time() - t0:.0f} s -> {args.out / 'gemv_variants.csv'}")
    for (bits, m), target in TARGETS.items():
        for r in rows:
            if r["weights"].startswith(f"W{bits}g") and r["m"] == m and r["variant"] == "dispatch":
                print(
                    f"target W{bits}A16 M={m} >= {target}x fp16: {r['n']}x{r['k']} {r['x_fp16']}x "
                    f"{'met' if r['x_fp16'] >= target else 'NOT met'}"
                )


if __name__ == "__main__":
    main()
