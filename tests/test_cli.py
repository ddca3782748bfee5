"""The command line: JSON output, and bad input as one-line errors with a non-zero exit."""

import json
import sys

import pytest

from qtool.cli import main


def run_cli(capsys, monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["qtool", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_json_is_the_last_line(capsys, monkeypatch, tiny_dir):
    code, out, _ = run_cli(
        capsys, monkeypatch, "eval", tiny_dir, "--seqlen", 16, "--windows", 2, "--device", "cpu", "--json"
    )
    assert code == 0
    result = json.loads(out.strip().splitlines()[-1])
    assert {"ppl", "seqlen", "windows", "spec"} <= result.keys() and result["windows"] == 2


@pytest.fixture
def bad_inputs(tmp_path, tiny_dir):
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for f in tiny_dir.iterdir():
        data = f.read_bytes()
        (truncated / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    old = tmp_path / "old-stage"
    old.mkdir()
    for f in tiny_dir.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    (old / "qtool.json").write_text(json.dumps({"format": 0, "stage": "calibrate", "fingerprint": "x", "history": []}))
    empty_txt = tmp_path / "empty.txt"
    empty_txt.write_text("   \n")
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"model: {tiny_dir}\nworkdir: {tmp_path}/w\nsteps:\n  - calibrate: {{nsamples: 2}}\n")
    return {
        "missing path": (["eval", tmp_path / "nope"], "not found"),
        "not a model directory": (["eval", empty_dir], "has no config.json"),
        "unknown id offline": (["eval", "no-such-org/no-such-model"], "cannot fetch hub model"),
        "truncated safetensors": (["eval", truncated], "truncated or corrupt"),
        "incompatible manifest": (["eval", old], "incompatible qtool"),
        "invalid spec": (["eval", tiny_dir, "--spec", "W4X4"], "invalid quantization spec"),
        "unknown recipe key": (["run", recipe], "unknown key 'nsamples'"),
        "empty data file": (["calibrate", tiny_dir, "-o", tmp_path / "c", "--data", empty_txt], "holds no text"),
        "static spec without stats": (["eval", tiny_dir, "--spec", "W8A8-tensor"], "qtool calibrate"),
        "no GPU": (["eval", tiny_dir, "--device", "cuda:7"], "--device cpu"),
        "unknown task": (["eval", tiny_dir, "--tasks", "piqa,hellaswag"], "unknown task 'hellaswag'"),
        "bad task data": (["eval", tiny_dir, "--tasks", "piqa", "--task-data", "piqa"], "must read TASK=PATH"),
        "reorder a plain model": (["reorder", tiny_dir, "-o", tmp_path / "r"], "needs a 'calibrate' stage"),
        "tune-e2e without quantized weights": (
            ["tune-e2e", tiny_dir, "-o", tmp_path / "e"],
            "has no quantized weights",
        ),
    }


CASES = [
    "missing path",
    "not a model directory",
    "unknown id offline",
    "truncated safetensors",
    "incompatible manifest",
    "invalid spec",
    "unknown recipe key",
    "empty data file",
    "static spec without stats",
    "no GPU",
    "unknown task",
    "bad task data",
    "reorder a plain model",
    "tune-e2e without quantized weights",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_error(capsys, monkeypatch, bad_inputs, case):
    if case == "no GPU":
        pytest.importorskip("torch")
        import torch

        if torch.cuda.device_count() > 7:
            pytest.skip("this machine has a cuda:7")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args, message = bad_inputs[case]
    code, out, err = run_cli(capsys, monkeypatch, *args)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert message in lines[0]
    assert "Traceback" not in err + out


def test_an_unexpected_exception_is_one_line_and_its_trace_is_kept(capsys, monkeypatch, tiny_dir, tmp_path):
    from qtool.stages.calibrate import Calibrate

    def broken(self, run):
        raise ZeroDivisionError("planted")

    monkeypatch.setattr(Calibrate, "work", broken)
    monkeypatch.setenv("QTOOL_CACHE", str(tmp_path / "cache"))
    code, out, err = run_cli(capsys, monkeypatch, "calibrate", tiny_dir, "-o", tmp_path / "c", "--device", "cpu")
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err + out
    assert lines[0].startswith("error: unexpected ZeroDivisionError: planted (a bug in qtool; full trace in ")
    (trace,) = (tmp_path / "cache" / "errors").iterdir()
    assert str(trace) in lines[0].replace("\n", "") and "raise ZeroDivisionError" in trace.read_text()
