"""Shared fixtures and helpers: tiny random models of every supported family, the real SmolLM2, the
per-channel statistics of one forward (the reorder stage and RPTQ tests), and small tmpfs mounts
(disk-full and read-only cases)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from qtool.core.checkpoint import layer_key
from qtool.models.adapters import adapter_for
from qtool.models.loading import load_tokenizer, resolve_model

_COMMON = dict(vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4)


def tiny_model(family: str, seed: int = 0, **config):
    """A randomly initialised model of `family` with GQA (2 KV heads) where the family has it; `config`
    overrides its configuration (e.g. vocab_size)."""
    torch.manual_seed(seed)
    gqa = dict(intermediate_size=96, num_key_value_heads=2)
    families = {
        "llama": (LlamaForCausalLM, LlamaConfig, gqa),
        "mistral": (MistralForCausalLM, MistralConfig, {**gqa, "sliding_window": 16}),
        "qwen2": (Qwen2ForCausalLM, Qwen2Config, gqa),
        "opt": (OPTForCausalLM, OPTConfig, dict(ffn_dim=96, max_position_embeddings=128, word_embed_proj_dim=64)),
    }
    if family not in families:
        raise ValueError(family)
    model_cls, config_cls, extra = families[family]
    return model_cls(config_cls(**{**_COMMON, **extra, **config})).eval()


def save_tiny(family: str, path: Path, tokenizer, **config) -> Path:
    """tiny_model(family) with its vocabulary sized to `tokenizer`, saved with it as a model directory."""
    model = tiny_model(family, vocab_size=len(tokenizer), **config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


FAMILIES = ("llama", "mistral", "qwen2", "opt")


def forward_stats(model, ids):
    """Per-channel min/max/absmax of every linear input and q/k/v output, from one forward."""
    adapter = adapter_for(model.config)
    seen, handles = {}, []
    for i, block in enumerate(adapter.layers(model)):
        for name, lin in adapter.linears(block).items():
            key = layer_key(i, name, "input")
            handles.append(lin.register_forward_pre_hook(lambda m, a, k=key: seen.__setitem__(k, a[0])))
            if name in (adapter.q, adapter.k, adapter.v):
                key = layer_key(i, name, "output")
                handles.append(lin.register_forward_hook(lambda m, a, o, k=key: seen.__setitem__(k, o)))
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    stats = {}
    for key, x in seen.items():
        flat = x.reshape(-1, x.shape[-1]).float()
        stats.update({f"{key}.min": flat.amin(0), f"{key}.max": flat.amax(0), f"{key}.absmax": flat.abs().amax(0)})
    return stats


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real default model, converted once into the qtool cache."""
    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    return load_tokenizer(smollm2_dir)


@pytest.fixture
def tiny_dir(tmp_path, smollm2_tokenizer):
    """A tiny random llama saved as a model directory, with SmolLM2's tokenizer (vocab sized to fit)."""
    return save_tiny("llama", tmp_path / "tiny-llama", smollm2_tokenizer)


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A tmpfs mounted at `path` with mount `options` (e.g. "size=1m", "size=1m,ro"); the test is
    skipped where mounting is not allowed (not root, no mount, a container without the capability)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)
