import json

import pytest

from qtool.core.errors import QtoolError
from qtool.recipe import load_recipe, run_recipe


def _write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "body, message",
    [
        (
            "model: m\nworkdir: w\nsteps:\n  - calibrate: {sampels: 4}\n",
            "steps\\[0\\].calibrate: unknown key 'sampels'",
        ),
        ("model: m\nworkdir: w\nsteps:\n  - quantize: {}\n", "unknown stage 'quantize'"),
        ("model: m\nworkdir: w\nstep: []\n", "unknown key 'step'"),
        ("model: m\nsteps:\n  - eval: {}\n", "missing key 'workdir'"),
        ("model: m\nworkdir: w\nsteps:\n  - eval: {windows: many}\n", "eval.windows: expected int or NoneType"),
        ("model: m\nworkdir: w\nsteps: [\n", "not valid YAML"),
    ],
)
def test_recipe_errors_name_the_offending_key(tmp_path, body, message):
    with pytest.raises(QtoolError, match=message):
        load_recipe(_write(tmp_path, body))


def test_shipped_recipes_are_valid():
    from pathlib import Path

    for path in Path(__file__).resolve().parents[1].glob("recipes/*.yaml"):
        assert load_recipe(path).steps


def test_recipe_runs_chain_and_skips_completed_steps(tiny_dir, tmp_path):
    body = f"""
model: {tiny_dir}
workdir: {tmp_path / "work"}
steps:
  - calibrate: {{samples: 2, seqlen: 16}}
  - eval: {{spec: W8A8-tensor, seqlen: 16, windows: 2}}
"""
    recipe = load_recipe(_write(tmp_path, body))
    first = run_recipe(recipe, device="cpu")
    assert first[0]["out"].endswith("00-calibrate") and not first[0]["skipped"]
    assert first[1]["model"].endswith("00-calibrate") and first[1]["spec"] == "W8A8-tensor"
    saved = json.loads((tmp_path / "work" / "01-eval.json").read_text())
    assert saved["result"]["ppl"] == first[1]["ppl"]
    second = run_recipe(recipe, device="cpu")
    assert second[0]["skipped"] and second[1]["skipped"] and second[1]["ppl"] == first[1]["ppl"]


def test_a_first_step_refused_by_its_checks_leaves_no_workdir(tiny_dir, tmp_path):
    body = f"model: {tiny_dir}\nworkdir: {tmp_path / 'work'}\nsteps:\n  - reorder: {{}}\n"
    with pytest.raises(QtoolError, match="needs a 'calibrate' stage"):
        run_recipe(load_recipe(_write(tmp_path, body)), device="cpu")
    assert not (tmp_path / "work").exists()
