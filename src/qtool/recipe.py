"""Recipes: a YAML file naming a model and the stages to run on it, in order.

    name: smollm2-w4g128            # optional label
    model: smollm2-135m             # model id, model directory or stage directory
    workdir: runs/smollm2-w4g128    # stage k is written to <workdir>/<k>-<stage>
    steps:
      - calibrate: {samples: 128, seqlen: 2048}
      - eval: {spec: W4A16-g128, windows: 40}

Each step reads the newest stage written before it (the model for the first). A step whose
output is already complete for the same inputs and parameters is skipped, so a rerun of a recipe
continues where it stopped. Keys are checked against the stage's parameters before anything runs.
"""

from __future__ import annotations

import json
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from qtool.core.checkpoint import check_writable, disk_errors, stage_fingerprint
from qtool.core.errors import QtoolError
from qtool.core.progress import console
from qtool.runtime.loader import open_source
from qtool.stages import STAGES
from qtool.stages.base import field_types, parameter_fields, validate


@dataclass(frozen=True)
class Step:
    kind: str
    options: dict  # parameter fields of the stage, checked


@dataclass(frozen=True)
class Recipe:
    path: Path
    name: str
    model: str
    workdir: Path
    steps: list[Step]


def _type_ok(value, hint) -> bool:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if isinstance(value, bool) and hint is not bool:
        return False
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(value, hint)


def _type_name(hint) -> str:
    return (
        " or ".join(_type_name(a) for a in typing.get_args(hint))
        if typing.get_args(hint)
        else getattr(hint, "__name__", str(hint))
    )


def _check_options(where: str, kind: str, options: dict) -> dict:
    """The step's options, each a field of the stage's parameters with a value of its type and in its
    declared range (checked now, before any step runs)."""
    params_type = STAGES[kind].params
    hints = field_types(params_type)
    keys = [f.name for f in parameter_fields(params_type) if f.name != "device"]
    for key, value in options.items():
        if key not in keys:
            raise QtoolError(f"{where}.{kind}: unknown key '{key}' (known: {', '.join(keys)})")
        if not _type_ok(value, hints[key]):
            raise QtoolError(f"{where}.{kind}.{key}: expected {_type_name(hints[key])}, got {value!r}")
    placeholders = {"model": "", "out": ""} if "out" in hints else {"model": ""}
    try:
        validate(params_type(**placeholders, **options))
    except QtoolError as exc:
        raise QtoolError(f"{where}.{kind}: {exc}") from None
    return options


def load_recipe(path: str | os.PathLike) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise QtoolError(f"recipe {path} not found; see recipes/ for examples")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise QtoolError(f"recipe {path} is not valid YAML{where}; fix the syntax") from None
    if not isinstance(raw, dict):
        raise QtoolError(f"recipe {path} must be a mapping with keys model, workdir, steps")
    unknown = set(raw) - {"name", "model", "workdir", "steps"}
    if unknown:
        raise QtoolError(f"recipe {path}: unknown key '{sorted(unknown)[0]}' (known: name, model, workdir, steps)")
    for key in ("model", "workdir", "steps"):
        if key not in raw:
            raise QtoolError(f"recipe {path}: missing key '{key}'")
    if not isinstance(raw["steps"], list) or not raw["steps"]:
        raise QtoolError(f"recipe {path}: 'steps' must be a non-empty list")
    steps = []
    for index, entry in enumerate(raw["steps"]):
        where = f"recipe {path}: steps[{index}]"
        if not isinstance(entry, dict) or len(entry) != 1:
            raise QtoolError(f"{where} must be a mapping with one stage name, e.g. '- calibrate: {{samples: 128}}'")
        ((kind, options),) = entry.items()
        if kind not in STAGES:
            raise QtoolError(f"{where}: unknown stage '{kind}' (known: {', '.join(STAGES)})")
        options = options or {}
        if not isinstance(options, dict):
            raise QtoolError(f"{where}.{kind} must be a mapping of options")
        steps.append(Step(kind, _check_options(where, kind, options)))
    workdir = Path(raw["workdir"])
    if not workdir.is_absolute():
        workdir = Path.cwd() / workdir
    return Recipe(path, str(raw.get("name", path.stem)), str(raw["model"]), workdir, steps)


def _cached_eval(out: Path, fingerprint: str) -> dict | None:
    try:
        saved = json.loads(out.read_text())
        return saved["result"] if saved["fingerprint"] == fingerprint else None
    except (OSError, ValueError, KeyError):
        return None


WORKDIR_HINT = "set another workdir in the recipe"


def run_recipe(recipe: Recipe, device: str = "auto") -> list[dict]:
    """Run every step; returns each step's result dict. Nothing is created before the first step
    starts: the model is opened and the workdir probed first, and the workdir itself is made by the
    first step that writes there (a stage refused by its own checks leaves none)."""
    current = recipe.model
    results = []
    open_source(current)  # a missing model fails here, before the workdir exists
    check_writable(recipe.workdir, WORKDIR_HINT)
    for index, step in enumerate(recipe.steps):
        stage = STAGES[step.kind]
        console.rule(f"[bold]{recipe.name}: step {index} {step.kind}")
        on = {"device": device} if "device" in field_types(stage.params) else {}
        if stage.writes:
            out = recipe.workdir / f"{index:02d}-{step.kind}"
            results.append(stage(stage.params(model=current, out=str(out), **on, **step.options)).as_dict())
            current = str(out)
            continue
        params = stage.params(model=current, **on, **step.options)
        out = recipe.workdir / f"{index:02d}-{step.kind}.json"
        fingerprint = stage_fingerprint(step.kind, params.fingerprint_params(), open_source(current))
        cached = _cached_eval(out, fingerprint)
        if cached is not None:
            console.print(f"[green]{step.kind}: {out} is complete for these inputs, skipped[/green]")
            results.append({**cached, "stage": step.kind, "skipped": True})
            continue
        result = {**stage(params).as_dict(), "stage": step.kind}
        tmp = out.with_name(out.name + ".tmp")
        try:
            with disk_errors(out, WORKDIR_HINT):
                out.parent.mkdir(parents=True, exist_ok=True)
                tmp.write_text(json.dumps({"fingerprint": fingerprint, "result": result}, indent=2, default=str))
                os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        results.append(result)
    return results
