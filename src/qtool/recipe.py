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

import dataclasses
import inspect
import json
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from qtool.core.checkpoint import stage_fingerprint
from qtool.core.errors import QtoolError
from qtool.core.progress import console
from qtool.runtime.loader import open_source


@dataclass(frozen=True)
class StepKind:
    params: type  # the stage's parameter dataclass (fields `model` and maybe `out` are filled in)
    run: Callable[..., dict]
    writes_stage: bool


def _steps() -> dict[str, StepKind]:
    from qtool.stages.calibrate import CalibrateParams, calibrate
    from qtool.stages.eval import EvalParams, evaluate
    from qtool.stages.pack import PackParams, pack
    from qtool.stages.reorder import ReorderParams, reorder
    from qtool.stages.train_blockap import BlockAPParams, train_blockap
    from qtool.stages.tune_e2e import TuneE2EParams, tune_e2e

    return {
        "calibrate": StepKind(CalibrateParams, calibrate, True),
        "reorder": StepKind(ReorderParams, reorder, True),
        "train-blockap": StepKind(BlockAPParams, train_blockap, True),
        "tune-e2e": StepKind(TuneE2EParams, tune_e2e, True),
        "pack": StepKind(PackParams, pack, True),
        "eval": StepKind(EvalParams, evaluate, False),
    }


@dataclass(frozen=True)
class Step:
    kind: str
    options: dict
    runtime: dict


@dataclass(frozen=True)
class Recipe:
    path: Path
    name: str
    model: str
    workdir: Path
    steps: list[Step]


def _runtime_options(run: Callable) -> dict:
    """Options of a stage function that do not change its result (batch size, checkpoint period):
    its keyword parameters besides `params` and `device`."""
    hints = typing.get_type_hints(run)
    return {
        name: hints[name] for name in inspect.signature(run).parameters if name not in ("params", "device", "return")
    }


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
    kinds = _steps()
    steps = []
    for index, entry in enumerate(raw["steps"]):
        where = f"recipe {path}: steps[{index}]"
        if not isinstance(entry, dict) or len(entry) != 1:
            raise QtoolError(f"{where} must be a mapping with one stage name, e.g. '- calibrate: {{samples: 128}}'")
        ((kind, options),) = entry.items()
        if kind not in kinds:
            raise QtoolError(f"{where}: unknown stage '{kind}' (known: {', '.join(kinds)})")
        options = options or {}
        if not isinstance(options, dict):
            raise QtoolError(f"{where}.{kind} must be a mapping of options")
        hints = typing.get_type_hints(kinds[kind].params)
        fields = {
            f.name: hints[f.name] for f in dataclasses.fields(kinds[kind].params) if f.name not in ("model", "out")
        }
        runtime_hints = _runtime_options(kinds[kind].run)
        params, runtime = {}, {}
        for key, value in options.items():
            target, hint = (params, fields.get(key)) if key in fields else (runtime, runtime_hints.get(key))
            if hint is None:
                known = ", ".join([*fields, *runtime_hints])
                raise QtoolError(f"{where}.{kind}: unknown key '{key}' (known: {known})")
            if not _type_ok(value, hint):
                raise QtoolError(f"{where}.{kind}.{key}: expected {_type_name(hint)}, got {value!r}")
            target[key] = value
        steps.append(Step(kind, params, runtime))
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


def run_recipe(recipe: Recipe, device: str = "auto") -> list[dict]:
    """Run every step; returns each step's result dict."""
    kinds = _steps()
    current = recipe.model
    results = []
    recipe.workdir.mkdir(parents=True, exist_ok=True)
    for index, step in enumerate(recipe.steps):
        kind = kinds[step.kind]
        console.rule(f"[bold]{recipe.name}: step {index} {step.kind}")
        if kind.writes_stage:
            out = recipe.workdir / f"{index:02d}-{step.kind}"
            params = kind.params(model=current, out=str(out), **step.options)
            results.append(kind.run(params, device=device, **step.runtime))
            current = str(out)
            continue
        params = kind.params(model=current, **step.options)
        out = recipe.workdir / f"{index:02d}-{step.kind}.json"
        fingerprint = stage_fingerprint(step.kind, params.fingerprint_params(), open_source(current))
        cached = _cached_eval(out, fingerprint)
        if cached is not None:
            console.print(f"[green]{step.kind}: {out} is complete for these inputs, skipped[/green]")
            results.append({**cached, "stage": step.kind, "skipped": True})
            continue
        result = {**kind.run(params, device=device, **step.runtime), "stage": step.kind}
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps({"fingerprint": fingerprint, "result": result}, indent=2, default=str))
        os.replace(tmp, out)
        results.append(result)
    return results
