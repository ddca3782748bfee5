"""Hostile model inputs through the command line: every command answers one `error:` line on stderr,
exits 2 and writes nothing, before any work starts (and never unpickles anything). The pairs that are
issue 23's cases are rows of tests/test_hostile_inputs.py instead; this matrix holds the rest."""

from __future__ import annotations

import json
import pickle
import shutil
import sys
from pathlib import Path

import pytest

from qtool.cli import main

# Every command that opens a model; `{m}` is the model, `{o}` an output directory that must not appear.
COMMANDS = {
    "eval": ["eval", "{m}", "--seqlen", "16", "--windows", "2", "--device", "cpu"],
    "calibrate": ["calibrate", "{m}", "-o", "{o}"],
    "pack": ["pack", "{m}", "-o", "{o}", "--spec", "W4A16-g32"],
    "memory": ["memory", "{m}"],
    "generate": ["generate", "{m}", "--prompt", "hello", "--max-new-tokens", "2", "--device", "cpu"],
    "train-blockap": ["train-blockap", "{m}", "-o", "{o}"],
    "tune-e2e": ["tune-e2e", "{m}", "-o", "{o}", "--spec", "W2A16-g32"],
}
CONFIG_ONLY = ("memory",)  # reads config.json alone: weight files are not its business


def _trap(marker: Path) -> bytes:
    """A pickle that touches `marker` when loaded."""

    class Trap:
        def __reduce__(self):
            return (Path.touch, (marker,))

    return pickle.dumps(Trap())


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del config[key]
    (path / "config.json").write_text(json.dumps(config))


def _not_json(m: Path, marker: Path) -> str:
    (m / "config.json").write_text('{\n  "model_type": "llama"\n  "hidden_size": 64\n}')
    return f"{m / 'config.json'} is not valid JSON (line 3"


def _no_model_type(m: Path, marker: Path) -> str:
    _edit_config(m, model_type=None)
    return f"{m / 'config.json'} has no model_type; set it to the model's family (qtool supports llama, mistral"


def _unknown_model_type(m: Path, marker: Path) -> str:
    _edit_config(m, model_type="frobnicator")
    return "model_type 'frobnicator' is not a model family transformers knows; qtool supports llama, mistral, opt"


def _unsupported_model_type(m: Path, marker: Path) -> str:
    _edit_config(m, model_type="gpt2")
    return "model_type 'gpt2' is not supported by qtool; qtool supports llama, mistral, opt, qwen2"


def _custom_code(m: Path, marker: Path) -> str:
    _edit_config(m, auto_map={"AutoModelForCausalLM": "modeling_evil.Evil"})
    (m / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w')\n")
    return f"{m} uses custom model code (auto_map); qtool never runs code from a model directory"


def _sizes_disagree(m: Path, marker: Path) -> str:
    _edit_config(m, hidden_size=128)
    return f"{m / 'model.safetensors'}: model.embed_tokens.weight is [{_vocab(m)}, 64] but config.json implies"


def _pickle_only(m: Path, marker: Path) -> str:
    (m / "model.safetensors").unlink()
    (m / "pytorch_model.bin").write_bytes(_trap(marker))
    return f"{m} holds pickle weights (pytorch_model.bin); convert to safetensors"


def _pickle_beside_stray_safetensors(m: Path, marker: Path) -> str:
    (m / "model.safetensors").rename(m / "stray.safetensors")
    (m / "pytorch_model.bin").write_bytes(_trap(marker))
    return f"{m} holds pickle weights (pytorch_model.bin); convert to safetensors"


def _vocab(m: Path) -> int:
    return json.loads((m / "config.json").read_text())["vocab_size"]


CASES = {
    "config not JSON": _not_json,
    "no model_type": _no_model_type,
    "unknown model_type": _unknown_model_type,
    "unsupported model_type": _unsupported_model_type,
    "custom code": _custom_code,
    "sizes disagree with weights": _sizes_disagree,
    "pickle weights only": _pickle_only,
    "pickle beside stray safetensors": _pickle_beside_stray_safetensors,
}
WEIGHT_CASES = ("sizes disagree with weights",)  # `memory` reads no weights, so it does not see these
# (case, command) pairs that are rows of tests/test_hostile_inputs.py (issue 23's table): tested there
TABLE_COMMANDS = ("eval", "calibrate", "pack", "memory", "generate")
IN_ISSUE_TABLE = {
    *((case, command) for case in ("config not JSON", "no model_type") for command in TABLE_COMMANDS),
    ("custom code", "calibrate"),
    ("sizes disagree with weights", "eval"),
    ("pickle beside stray safetensors", "eval"),
}


def files_under(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*")}


def run_cli(capsys, monkeypatch, args) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what fixtures printed (transformers' save progress)
    monkeypatch.setattr(sys, "argv", ["qtool", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, fragment: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in err


@pytest.fixture
def hostile(tmp_path, tiny_dir):
    """A corruptible copy of the tiny llama, and a marker file that must never appear."""
    work = tmp_path / "work"
    model = work / "model"
    shutil.copytree(tiny_dir, model)
    return work, model, work / "code-ran"


PAIRS = [
    (case, command)
    for case in CASES
    for command in COMMANDS
    if (case, command) not in IN_ISSUE_TABLE
    and not (command in CONFIG_ONLY and (case in WEIGHT_CASES or "pickle" in case))  # `memory` reads no weights
]


@pytest.mark.parametrize("case, command", PAIRS)
def test_hostile_model_is_one_line_error(capsys, monkeypatch, hostile, case, command):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    work, model, marker = hostile
    fragment = CASES[case](model, marker)
    before = files_under(work)
    args = [a.format(m=model, o=work / "out") for a in COMMANDS[command]]
    code, _, err = run_cli(capsys, monkeypatch, args)
    assert_one_line_error(code, err, fragment)
    assert files_under(work) == before  # nothing written: no output, no partial journal, no marker
    assert not marker.exists()


def test_memory_of_a_hostile_config_file(capsys, monkeypatch, tmp_path):
    """`qtool memory` also takes a bare config.json file."""
    config = tmp_path / "config.json"
    for text, fragment in [
        ("{oops", f"{config} is not valid JSON (line 1"),
        (json.dumps({"hidden_size": 64}), f"{config} has no model_type"),
        (json.dumps({"model_type": "llama", "auto_map": {"AutoConfig": "x.Y"}}), "uses custom model code (auto_map)"),
    ]:
        config.write_text(text)
        assert_one_line_error(*run_cli(capsys, monkeypatch, ["memory", config])[::2], fragment)
