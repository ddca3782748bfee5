"""Where a Decoder decode step spends its GPU time: the CUDA-graph step time of a packed model under
settings (attention keys per block), and per-kernel totals (torch.profiler,
CUPTI) of eager steps under the first setting.

Usage: PYTHONPATH=src python3 benchmarks/profile_decode.py --model llama2-7b --layers 4 --specs fp16,W2A8 --chunks 64,32
"""

from __future__ import annotations

import argparse
import collections
import json

import torch


def kernel_table(dec, ids, start, steps: int) -> list[tuple[float, float, str]]:
    """(us per step, launches per step, kernel name) of eager steps, largest first."""
    for _ in range(3):
        dec.forward(ids, start)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            dec.forward(ids, start)
        torch.cuda.synchronize()
    totals = collections.defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            totals[ev.name[:90]][0] += ev.time_range.elapsed_us()
            totals[ev.name[:90]][1] += 1
    return sorted(((v[0] / steps, v[1] / steps, k) for k, v in totals.items()), reverse=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama2-7b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--specs", default="fp16,W4A16-g128,W2A16-g64,W2A8")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--chunks", default="", help="attention keys per block to compare (default: the kernel's)")
    ap.add_argument("--no-kernels", action="store_true", help="graph step times only")
    ap.add_argument("--out", default=None, help="JSONL file for the rows")
    args = ap.parse_args()

    from qtool.bench.e2e import _replayed, packed_variant
    from qtool.kernels import attention
    from qtool.runtime.decoder import Decoder

    default_chunk = attention.max_chunk
    for spec in args.specs.split(","):
        model = packed_variant(args.model, args.layers, spec, "cuda")
        prompt = torch.randint(0, model.config.vocab_size, (args.batch, args.context), device="cuda")
        ids = torch.randint(0, model.config.vocab_size, (args.batch, 1), device="cuda")
        start = torch.tensor(args.context, device="cuda")
        first = True
        for chunk in args.chunks.split(",") if args.chunks else [""]:
            attention.max_chunk = (lambda d, c=int(chunk): c) if chunk else default_chunk
            dec = Decoder(model, args.batch, args.context + 1)
            dec.forward(prompt, 0)
            graph_s, how = _replayed(lambda d=dec, i=ids, s=start: d.forward(i, s), 100)
            row = {
                "spec": spec,
                "chunk": dec._attention.chunk if dec._attention else None,
                "graph_us": round(graph_s * 1e6, 1),
                "timing": how,
                "blocks": args.layers,
            }
            if first and not args.no_kernels:
                table = kernel_table(dec, ids, start, args.steps)
                row["kernel_us"] = round(sum(t[0] for t in table), 1)
                row["kernels"] = [[round(u, 2), n, k] for u, n, k in table]
            first = False
            print(json.dumps({k: v for k, v in row.items() if k != "kernels"}))
            for us, n, name in row.get("kernels", [])[:14]:
                print(f"{us:9.1f} us {n:6.1f}x  {name}")
            if args.out:
                with open(args.out, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
            del dec
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
