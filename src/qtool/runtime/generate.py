"""`qtool generate`: greedy text generation from a model, stage or packed checkpoint, through the
Decoder (static cache, CUDA-graph steps) where the family has one, transformers' generate otherwise."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from qtool.core.errors import QtoolError


def check_context(path: Path, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse, before loading the model, a prompt plus new tokens longer than the model's context
    (`max_position_embeddings` of its config.json; no limit when the config names none)."""
    from qtool.models.loading import read_config

    context = read_config(Path(path) / "config.json").get("max_position_embeddings")
    if isinstance(context, int) and prompt_tokens + max_new_tokens > context:
        raise QtoolError(
            f"prompt is {prompt_tokens} tokens + {max_new_tokens} new > the model's context {context}; "
            "shorten the prompt or lower --max-new-tokens"
        )


def generate_text(model_ref: str, prompt: str, max_new_tokens: int, device: str = "auto", dtype: str = "auto") -> dict:
    from qtool.core.devices import pick_device, pick_dtype
    from qtool.models.loading import load_tokenizer
    from qtool.runtime.decoder import Decoder
    from qtool.runtime.loader import load, open_source
    from qtool.runtime.packed_model import to_kernel_form

    if not prompt:
        raise QtoolError("the prompt is empty: pass --prompt TEXT")
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype if dtype != "auto" else ("float16" if dev.type == "cuda" else "float32"))
    source = open_source(model_ref)
    check_context(source.path, len(load_tokenizer(source.path)(prompt).input_ids), max_new_tokens)
    model, tokenizer = load(source, torch_dtype)
    model.to(dev)
    if dev.type == "cuda":
        to_kernel_form(model)  # packed linears keep only what their kernels read
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(dev)
    try:
        decoder = Decoder(model, 1, ids.shape[1] + max_new_tokens)
        runtime = "qtool"
    except QtoolError:
        decoder, runtime = None, "transformers"
    # a first short run compiles the fused ops and captures the step graph, so the timed run is steady
    run = (
        (lambda n: decoder.generate(ids, n, tokenizer.eos_token_id))
        if decoder
        else (lambda n: model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.eos_token_id))
    )
    with torch.no_grad():
        run(2)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = run(max_new_tokens)
        if dev.type == "cuda":
            torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[1] :]
    return {
        "model": str(source.path),
        "runtime": runtime,
        "device": str(dev),
        "prompt": prompt,
        "text": tokenizer.decode(new, skip_special_tokens=True),
        "new_tokens": int(new.numel()),
        "seconds": round(seconds, 3),
        "tokens_per_s": round(new.numel() / seconds, 1),
    }
