"""Peak memory of E2E-QP (step sizes only) against full fine-tuning, same model, data and steps.

    python benchmarks/e2e_memory.py --model smollm2-135m --mode e2e --spec W2A16-g64 --seqlen 1024
    python benchmarks/e2e_memory.py --shape llama2-7b --mode full --seqlen 2048     # random weights, GPU

Each run does a few AdamW steps (gradient checkpointing on, bf16 autocast on GPU) and prints one
JSON line: peak memory (CUDA max allocated, or CPU peak RSS of this process: run modes in separate
processes), trainable parameters and the step time. `--shape llama2-7b` builds LLaMA-2-7B's
architecture with random bf16 weights on the GPU (a memory measurement, not a quality one).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qtool.core.devices import pick_device
from qtool.core.spec import parse_spec
from qtool.models.adapters import adapter_for
from qtool.quant.qparams import model_qparams
from qtool.quant.step_sizes import install_step_size_linears
from qtool.runtime.loader import load, open_source
from qtool.stages.tune_e2e import peak_memory_bytes

SHAPES = {
    "llama2-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
}


def build(args, device):
    if args.shape:
        config = LlamaConfig(**SHAPES[args.shape])
        with device:
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        return model
    model, _ = load(open_source(args.model))
    return model.to(device)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--shape", choices=sorted(SHAPES))
    ap.add_argument("--mode", choices=["e2e", "full"], required=True)
    ap.add_argument("--spec", default="W2A16-g64")
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = pick_device(args.device)
    model = build(args, device)
    adapter = adapter_for(model.config)
    if args.mode == "e2e":
        spec = parse_spec(args.spec)
        with torch.no_grad():
            qparams = model_qparams(model, adapter, spec)
        params = [m.scale for m in install_step_size_linears(model, adapter, qparams, spec.group)]
        del qparams
    else:
        model.float()  # full fine-tuning keeps fp32 master weights
        params = [p for p in model.parameters()]
        for p in params:
            p.requires_grad_(True)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-5)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seqlen), device=device)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    times = []
    status = "ok"
    try:
        for _ in range(args.steps):
            t0 = time.time()
            with autocast:
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.time() - t0)
    except torch.OutOfMemoryError:
        status = "out of memory"
    print(
        json.dumps(
            {
                "model": args.shape or args.model,
                "mode": args.mode,
                "spec": args.spec if args.mode == "e2e" else "bf16/fp32",
                "status": status,
                "seqlen": args.seqlen,
                "batch": args.batch,
                "device": str(device),
                "trainable_params": sum(p.numel() for p in params),
                "peak_memory_gib": round(peak_memory_bytes(device) / 2**30, 3),
                "step_s": round(sorted(times)[len(times) // 2], 3) if times else None,
            }
        )
    )


if __name__ == "__main__":
    main()
