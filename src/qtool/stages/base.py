"""The Stage base: what every stage does once, so a stage module holds only its own work.

A stage is a `Stage` subclass with a parameter dataclass and a typed result. `Stage.__call__`
validates the parameters (ranges and choices declared with `param`), opens the source, lets the
stage refuse bad inputs (`check`), skips work already complete for the same fingerprint, and times
the run; `work` gets a `Run` that hands out the writer, the journal, the loaded model and the
training windows. The parameter dataclass is also the single source of the stage's CLI options
(`qtool.cli`) and recipe keys (`qtool.recipe`).
"""

from __future__ import annotations

import dataclasses
import os
import time
import types
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from qtool.core import distributed
from qtool.core.checkpoint import (
    BlockJournal,
    StageDir,
    StageWriter,
    check_output,
    is_complete,
    keeps_journal,
    stage_fingerprint,
)
from qtool.core.data import calibration_windows, content_params, read_text, token_ids
from qtool.core.devices import pick_device
from qtool.core.errors import QtoolError
from qtool.core.progress import console
from qtool.models.adapters import adapter_for
from qtool.runtime.loader import load, open_source

# -- parameters -------------------------------------------------------------------------------------


def param(
    default: Any,
    help: str = "",
    *,
    min: float | None = None,
    above: float | None = None,
    max: float | None = None,
    choices: tuple | None = None,
    flags: tuple[str, ...] = (),
    check: Callable[[Any], Any] | None = None,
    result: bool = True,
    cli: bool = True,
):
    """A stage parameter: its default, help text and allowed values, declared once.

    min / max: inclusive bounds; above: exclusive lower bound (learning rates); choices: allowed
    values; flags: the CLI's option names when not `--field-name`; check: a parser that raises a
    one-line error on a bad value (e.g. `parse_spec`); result=False: a runtime option
    (device, batch size of the forward pass) that does not change the result, so it is left out of
    the fingerprint; cli=False: a recipe key with no CLI option."""
    meta = {"help": help, "min": min, "above": above, "max": max, "choices": choices}
    meta.update(flags=tuple(flags), check=check, result=result, cli=cli)
    return field(default=default, metadata=meta)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _option_name(f: dataclasses.Field) -> str:
    flags = f.metadata.get("flags") or (flag_name(f.name),)
    return flags[0].split("/")[0]


def parameter_fields(params_type: type) -> list[dataclasses.Field]:
    """The fields a user sets: every field but the input and output paths."""
    return [f for f in dataclasses.fields(params_type) if f.name not in ("model", "out")]


def field_types(params_type: type) -> dict[str, Any]:
    return typing.get_type_hints(params_type)


def range_text(f: dataclasses.Field) -> str:
    """The allowed values of a field in words, e.g. '>= 1', '> 0', 'in [0, 1]', 'one of a, b'."""
    m = f.metadata
    if m.get("choices"):
        return "one of " + ", ".join(map(str, m["choices"]))
    low = f">= {m['min']}" if m.get("min") is not None else f"> {m['above']}" if m.get("above") is not None else None
    if low and m.get("max") is not None:
        return f"{low} and <= {m['max']}"
    return low or (f"<= {m['max']}" if m.get("max") is not None else "")


def validate(params) -> None:
    """One-line error for the first value outside its declared range or choices."""
    for f in parameter_fields(type(params)):
        value, m = getattr(params, f.name), f.metadata
        if value is None or isinstance(value, bool) or not m:
            continue
        bad = (
            (m.get("choices") and value not in m["choices"])
            or (m.get("min") is not None and value < m["min"])
            or (m.get("above") is not None and value <= m["above"])
            or (m.get("max") is not None and value > m["max"])
        )
        if bad and m.get("choices"):
            raise QtoolError(f"unknown {_option_name(f)} {value!r}: use one of {', '.join(map(str, m['choices']))}")
        if bad:
            raise QtoolError(f"{_option_name(f)} must be {range_text(f)}, got {value!r}")
        if m.get("check"):
            m["check"](value)


@dataclass(frozen=True)
class Params:
    """What every command is given: its input. Every field marked as a result parameter goes into
    the fingerprint; runtime options (`param(..., result=False)`) do not."""

    model: str

    def fingerprint_params(self) -> dict:
        runtime = {f.name for f in dataclasses.fields(self) if not f.metadata.get("result", True)}
        return {k: v for k, v in asdict(self).items() if k not in ("model", "out", *runtime)}


@dataclass(frozen=True)
class StageParams(Params):
    """A command that writes a stage directory `out`."""

    out: str
    force: bool = param(
        False, "Replace an output directory that holds another stage.", flags=("--force",), result=False
    )


DEVICE_HELP = "Compute device: auto, cpu, cuda, cuda:N."
BATCH_HELP = "Windows per forward pass."


@dataclass(frozen=True)
class TextStageParams(StageParams):
    """A stage that samples `samples` windows of `seqlen` tokens (seed `seed`) from `data`."""

    data: str = param("wikitext2-valid", "wikitext2-valid, wikitext2-test, or a .txt/.jsonl file.")
    samples: int = param(128, "Calibration / training windows.", min=1)
    seqlen: int = param(2048, "Tokens per window.", min=2)
    seed: int = param(0, "Seed of the window sampling (and of the training order).")
    text_field: str = param("text", "Field holding the text in a .jsonl file.")
    device: str = param("auto", DEVICE_HELP, result=False)
    nproc: int = param(
        1,
        "Processes (torch.distributed ranks: one per GPU, or CPU processes) that split the windows; "
        "the result is the one-process result.",
        min=1,
        result=False,
    )


# -- results --------------------------------------------------------------------------------------


class Result:
    """What a command returns; `as_dict` is its `--json` and recipe form, `rows` its CLI table."""

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str | None:
        """The one line printed when the work is done (None: none)."""
        return None

    def rows(self) -> dict:
        """Rows of the CLI's summary table (empty: no table)."""
        return {}

    def tables(self) -> list:
        """Further tables the CLI prints before the summary table."""
        return []


@dataclass(kw_only=True)
class StageResult(Result):
    """A stage written (or found complete) at `out`."""

    stage: str
    out: str
    skipped: bool = False
    seconds: float | None = None

    def as_dict(self) -> dict:
        if self.skipped:
            return {"stage": self.stage, "out": self.out, "skipped": True}
        return asdict(self)


# -- stages ---------------------------------------------------------------------------------------


class Stage:
    """One stage. Subclasses set `name`, `params` and `help`, and implement `work`; `check` refuses
    bad inputs before any work is done."""

    name: ClassVar[str]
    params: ClassVar[type[Params]]
    help: ClassVar[str]
    model_help: ClassVar[str] = "Model id (smollm2-135m), model directory or stage directory."
    writes: ClassVar[bool] = True  # False: the result is returned, no stage directory written
    distributed: ClassVar[bool] = False  # True: runs on N ranks (`--nproc N` or torchrun)

    def check(self, params, source: StageDir) -> None:
        """Refuse inputs this stage cannot take; runs before the skip check and any loading."""

    def check_world(self, params, n: int) -> None:
        """Refuse parameters that do not split over n processes (the windows, by default)."""
        distributed.require_split("--samples", params.samples, n)

    def _world(self, params) -> int:
        """The number of processes this call runs on: torchrun's (or the launcher's), or --nproc."""
        n = getattr(params, "nproc", 1)
        if not distributed.launched():
            return n
        size = int(os.environ["WORLD_SIZE"])
        if not self.distributed:
            raise QtoolError(f"qtool {self.name} runs in one process; start it without torchrun")
        if n not in (1, size):
            raise QtoolError(f"--nproc {n} inside a run of {size} processes (torchrun): leave --nproc out")
        distributed.init(pick_device(params.device))
        return size

    def work(self, run: Run) -> Result:
        raise NotImplementedError

    def __call__(self, params, **overrides) -> Result:
        """Run the stage on `params` (fields in `overrides` replaced), or find it complete."""
        if overrides:
            params = dataclasses.replace(params, **overrides)
        validate(params)
        n = self._world(params)
        # a model id is downloaded or converted once, by rank 0, before the others open it
        first = n > 1 and not Path(str(params.model)).expanduser().is_dir()
        if first and not distributed.is_writer():
            distributed.barrier()
        source = open_source(params.model)
        if first and distributed.is_writer():
            distributed.barrier()
        self.check(params, source)
        if n > 1:
            self.check_world(params, n)
        run = Run(self, params, source)
        if self.writes:
            check_output(params.out, source, params.force, run.fingerprint)
        complete = self.writes and is_complete(run.out, run.fingerprint)
        distributed.barrier()  # every rank has decided before rank 0 writes anything
        if complete:
            console.print(f"[green]{self.name}: {params.out} is complete for these inputs, skipped[/green]")
            return StageResult(stage=self.name, out=str(params.out), skipped=True)
        if n > 1 and not distributed.launched():
            from qtool.stages.launch import launch

            return launch(self, params, n)
        try:
            result = self.work(run)
            distributed.barrier()  # the other ranks return once rank 0 has committed
        except BaseException as exc:
            # the journal stays only where a rerun resumes from it: saved blocks, and a failure that
            # a rerun may not repeat (a crash, Ctrl-C, a disk error; not qtool's own refusals)
            if run._journal is not None and (run._journal.empty() or not keeps_journal(exc)):
                run._journal.remove()
            raise
        line = result.summary()
        if line:
            console.print(line)
        return result


@dataclass
class Run:
    """One run of a stage: its parameters and source, and the helpers every stage's work uses."""

    stage: Stage
    params: Any
    source: StageDir
    started: float = field(default_factory=time.time)

    def __post_init__(self):
        self.fp_params = content_params(self.params.fingerprint_params())
        self.fingerprint = stage_fingerprint(self.stage.name, self.fp_params, self.source)
        self._journal: BlockJournal | None = None

    @property
    def out(self) -> Path:
        return Path(self.params.out)

    def seconds(self) -> float:
        """Seconds since the run started, as results report them."""
        return round(time.time() - self.started, 2)

    def device(self) -> torch.device:
        """The compute device (in a distributed run on GPUs: this rank's GPU)."""
        return distributed.device(pick_device(self.params.device))

    def load(self, dtype: torch.dtype = torch.float32):
        """(model on CPU, tokenizer, adapter) of the source."""
        model, tokenizer = load(self.source, dtype)
        return model, tokenizer, adapter_for(model.config)

    def windows(self, tokenizer) -> torch.Tensor:
        """The calibration / training windows the parameters ask for."""
        p = self.params
        return calibration_windows(
            token_ids(tokenizer, read_text(p.data, p.text_field)), p.samples, p.seqlen, p.seed, p.data
        )

    def journal(self) -> BlockJournal:
        """The run's journal (resumes a killed run; removed when the stage is committed)."""
        if self._journal is None:
            if distributed.world_size() > 1:
                self._journal = distributed.SharedJournal(
                    lambda: BlockJournal(self.out, self.fingerprint), lambda: BlockJournal.reading(self.out)
                )
            else:
                self._journal = BlockJournal(self.out, self.fingerprint)
        return self._journal

    def writer(self, spec: str | None = None, inherit_tensors: bool = True) -> StageWriter:
        """The stage's writer; on the ranks but 0 of a distributed run one that writes nothing."""
        if not distributed.is_writer():
            return _NoWriter()
        return StageWriter(
            self.out,
            self.stage.name,
            self.fp_params,
            self.source,
            spec,
            inherit_tensors=inherit_tensors,
            world_size=distributed.world_size(),
        )

    def commit(self, writer: StageWriter, **metrics) -> None:
        """Record metrics and the work's time in the manifest, move the stage into place, and drop
        the journal."""
        writer.metrics.update(metrics)
        writer.timings["work_s"] = round(time.time() - self.started, 3)
        writer.commit()
        if self._journal is not None:
            self._journal.remove()


class _NoWriter:
    """The writer of the ranks that do not write: takes everything, writes nothing."""

    def __init__(self):
        self.metrics: dict = {}
        self.timings: dict = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def save_model(self, *args, **kwargs) -> None:
        pass

    def save_tensors(self, *args, **kwargs) -> None:
        pass

    def commit(self) -> None:
        pass


def plain_type(hint):
    """`X | None` as typing.Optional[X] (what the CLI library understands)."""
    if isinstance(hint, types.UnionType):
        return typing.Union[hint.__args__]  # noqa: UP007
    return hint
