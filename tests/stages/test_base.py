"""The Stage base: parameters declared once (CLI options, recipe keys, ranges), fingerprints that
match the layout before the Stage base existed, validation before any work."""

import json
from pathlib import Path

import pytest
import typer.main

from qtool.cli import app
from qtool.core.checkpoint import StageDir, stage_fingerprint
from qtool.core.errors import QtoolError
from qtool.recipe import load_recipe
from qtool.stages import STAGES
from qtool.stages.base import validate
from qtool.stages.calibrate import CalibrateParams
from qtool.stages.eval import EvalParams
from qtool.stages.pack import PackParams
from qtool.stages.reorder import ReorderParams
from qtool.stages.train_blockap import BlockAPParams
from qtool.stages.tune_e2e import TuneE2EParams

# The options of the hand-written commands before the Stage base (qtool 7d746c1, `qtool CMD --help`):
# the generated commands must keep every one of them.
OLD_OPTIONS = {
    "calibrate": "--batch-size --data --device --json --out --samples --seed --seqlen --text-field -o model",
    "reorder": "--clusters --head-clusters --json --out --seed -o model",
    "train-blockap": "--alpha --batch-size --cosine --data --device --epochs --json --lr-comp --lr-let --lr-lwc "
    "--lr-qparams --lr-weight --no-cosine --out --preset --samples --seed --seqlen --spec --text-field -o model",
    "tune-e2e": "--batch-size --data --device --epochs --grad-accum --grad-checkpointing --json --lr --max-grad-norm "
    "--no-grad-checkpointing --out --samples --save-every --seed --seqlen --spec --text-field --warmup-ratio "
    "--weight-decay -o model",
    "pack": "--dtype --format --json --layout --out --spec -o model",
    "eval": "--batch-size --data --device --dtype --json --limit --mem-batch --mem-seqlen --no-ppl --ppl --seqlen "
    "--spec --task-data --tasks --text-field --windows model",
}


@pytest.mark.parametrize("name", sorted(OLD_OPTIONS))
def test_generated_commands_keep_every_option(name):
    command = typer.main.get_command(app).commands[name]
    options = sorted(o for p in command.params for o in p.opts + p.secondary_opts)
    new = ["--force"] if name != "eval" else []  # hardening: replacing another stage is asked for
    if name in ("calibrate", "train-blockap", "tune-e2e"):
        new.append("--nproc")  # issue 21: data-parallel runs on torch.distributed
    assert options == sorted(OLD_OPTIONS[name].split() + new)


def test_cli_defaults_are_the_dataclass_defaults():
    command = typer.main.get_command(app).commands["tune-e2e"]
    defaults = {p.name: p.default for p in command.params}
    assert defaults["lr"] == 2e-5 and defaults["grad_accum"] == 8 and defaults["save_every"] == 20
    assert defaults["grad_checkpointing"] is True and defaults["spec"] is None


# Fingerprints computed by the code before the Stage base for the same parameters and parent: a
# stage written then is still "complete" now, and runtime options stay out of the fingerprint.
PARENT = StageDir(Path("/x"), {"stage": "calibrate", "fingerprint": "0123456789abcdef", "history": []})
OLD_FINGERPRINTS = [
    ("calibrate", CalibrateParams("m", "o", batch_size=8, device="cpu"), "696c324047512f0c"),
    ("tune-e2e", TuneE2EParams("m", "o", spec="W2A16-g64", lr=1e-4, save_every=3), "5fd53e9b7fbdd121"),
    (
        "train-blockap",
        BlockAPParams("m", "o", preset="efficientqat", spec="W2A16-g64", batch=2, cosine=False, batch_size=1),
        "390e7ea075e33e0f",
    ),
    ("pack", PackParams("m", "o", spec="W4A4", layout="u8"), "3be50bfaf60164ab"),
    ("reorder", ReorderParams("m", "o", clusters=8), "51fc5743138787aa"),
    ("eval", EvalParams("m", spec="W4A16-g128", windows=3, tasks="piqa", batch_size=4), "c1fbe0d25049bd7e"),
]


@pytest.mark.parametrize("name, params, expected", OLD_FINGERPRINTS, ids=[c[0] for c in OLD_FINGERPRINTS])
def test_fingerprints_are_unchanged(name, params, expected):
    assert stage_fingerprint(name, params.fingerprint_params(), PARENT) == expected


@pytest.mark.parametrize(
    "params, message",
    [
        (TuneE2EParams("m", "o", lr=-1.0), "--lr must be > 0.0, got -1.0"),
        (TuneE2EParams("m", "o", weight_decay=-5.0), "--weight-decay must be >= 0.0, got -5.0"),
        (TuneE2EParams("m", "o", warmup_ratio=5.0), "--warmup-ratio must be >= 0.0 and <= 1.0, got 5.0"),
        (TuneE2EParams("m", "o", max_grad_norm=-1.0), "--max-grad-norm must be > 0.0, got -1.0"),
        (CalibrateParams("m", "o", samples=0), "--samples must be >= 1, got 0"),
        (BlockAPParams("m", "o", preset="gptq"), "unknown --preset 'gptq': use one of omniquant, efficientqat, abq"),
        (BlockAPParams("m", "o", batch=0), "--batch-size must be >= 1, got 0"),
        (BlockAPParams("m", "o", spec="W4X4"), "invalid quantization spec"),
        (PackParams("m", "o", layout="nibbles"), "unknown --layout 'nibbles'"),
        (EvalParams("m", windows=0), "--windows must be >= 1, got 0"),
    ],
)
def test_values_outside_their_declared_range_are_refused(params, message):
    with pytest.raises(QtoolError) as info:
        validate(params)
    assert message in str(info.value)


def test_recipe_values_are_checked_before_the_first_step(tmp_path, tiny_dir):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {tiny_dir}\nworkdir: {tmp_path / 'w'}\nsteps:\n"
        "  - calibrate: {samples: 2, seqlen: 16}\n  - tune-e2e: {spec: W4A16, warmup_ratio: 5.0}\n"
    )
    with pytest.raises(QtoolError, match=r"steps\[1\].tune-e2e: --warmup-ratio must be >= 0.0 and <= 1.0"):
        load_recipe(recipe)
    assert not (tmp_path / "w").exists()


def test_recipe_keys_are_the_parameter_fields():
    recipe_keys = {"save_every", "batch_size", "lr", "spec"}
    fields = {f for f in TuneE2EParams.__dataclass_fields__ if f not in ("model", "out", "device")}
    assert recipe_keys <= fields
    assert set(STAGES) == {"calibrate", "reorder", "train-blockap", "tune-e2e", "pack", "eval"}


def test_skipped_result_is_the_short_form(tiny_dir, tmp_path):
    params = CalibrateParams(str(tiny_dir), str(tmp_path / "c"), samples=2, seqlen=16, device="cpu")
    first = STAGES["calibrate"](params)
    assert first.as_dict()["tokens"] == 32 and not first.skipped
    again = STAGES["calibrate"](params).as_dict()
    assert again == {"stage": "calibrate", "out": str(tmp_path / "c"), "skipped": True}
    manifest = json.loads((tmp_path / "c" / "qtool.json").read_text())
    assert manifest["metrics"]["tokens"] == 32 and "work_s" in manifest["timings"]
