"""Stage directories: a Hugging Face model directory plus qtool's manifest and stage tensors.

    <stage>/config.json, tokenizer files, model*.safetensors   float weights (transformers loads them)
    <stage>/qtool-<name>.safetensors                           stage tensors (stats, permutations, ...)
    <stage>/qtool.json                                          manifest, written last

A child stage starts from its parent's files (hard links where possible, so unchanged weights
cost no disk) and adds or replaces its own. Writes go to a temporary sibling directory that is
renamed into place at the end, so a stage directory is either complete or absent. Long stages keep
per-block results in a journal beside the target so a killed run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qtool.core import __version__
from qtool.core.errors import QtoolError

MANIFEST = "qtool.json"
FORMAT = 1
STAGE_PREFIX = "qtool-"
WEIGHT_PATTERNS = ("model*.safetensors", "model.safetensors.index.json")


# -- safetensors integrity ------------------------------------------------------------------------


def check_safetensors(path: Path) -> None:
    """Raise a one-line error if the file's header is unreadable or its data is cut short."""
    hint = "re-create it (delete it and run the stage again)"
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            if header_len > size - 8:
                raise ValueError("header longer than file")
            header = json.loads(fh.read(header_len))
    except (OSError, ValueError, struct.error, UnicodeDecodeError):
        raise QtoolError(f"{path} is truncated or corrupt (unreadable safetensors header); {hint}") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end != size:
        raise QtoolError(f"{path} is truncated or corrupt ({size} bytes, header says {8 + header_len + end}); {hint}")


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    check_safetensors(path)
    return load_file(path)


def check_model_files(path: Path) -> None:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise QtoolError(f"{path} has no .safetensors weights; convert the model to safetensors first")
    for f in files:
        check_safetensors(f)


# -- tensor names ----------------------------------------------------------------------------------


def layer_key(block: int, *parts: str) -> str:
    """The one naming scheme of per-block stage tensors: `layers.{block}.{part}.{part}...`, e.g.
    `layers.3.q_proj.input.max` (statistics), `layers.3.q_proj.scale` (qparams),
    `layers.3.attn_in.perm` (reorder)."""
    return ".".join(("layers", str(block), *parts))


# -- manifests and fingerprints -------------------------------------------------------------------


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_fingerprint(path: Path) -> str:
    """Identity of a plain model directory: its config and its weight files' names, sizes, times."""
    files = sorted(p for pattern in WEIGHT_PATTERNS for p in path.glob(pattern))
    return _digest(
        [(path / "config.json").read_text(), [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]]
    )


@dataclass
class StageDir:
    """A model directory, with its manifest when it is a qtool stage."""

    path: Path
    manifest: dict | None = None

    @property
    def name(self) -> str | None:
        return self.manifest["stage"] if self.manifest else None

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"] if self.manifest else model_fingerprint(self.path)

    @property
    def spec(self) -> str | None:
        """The quantization spec this directory's weights were made for (newest stage that set one)."""
        specs = [h.get("spec") for h in self.manifest["history"] if h.get("spec")] if self.manifest else []
        return specs[-1] if specs else None

    @property
    def stages(self) -> list[str]:
        """Names of every stage in this directory's history, oldest first."""
        return [h["stage"] for h in self.manifest["history"]] if self.manifest else []

    def has_tensors(self, name: str) -> bool:
        return (self.path / f"{STAGE_PREFIX}{name}.safetensors").is_file()

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        path = self.path / f"{STAGE_PREFIX}{name}.safetensors"
        if not path.is_file():
            raise QtoolError(f"{self.path} has no {name} tensors; run `qtool {name}` to make a stage that has them")
        return load_tensors(path)

    def require(self, needed: str, command: str) -> None:
        """Fail clearly unless this directory's history includes stage `needed`."""
        if needed not in self.stages:
            got = f"a '{self.name}' stage" if self.manifest else "a plain model directory"
            raise QtoolError(
                f"`qtool {command}` needs a '{needed}' stage, but {self.path} is {got}; run `qtool {needed}` first"
            )


def open_stage(path: Path) -> StageDir:
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        return StageDir(path)
    try:
        manifest = json.loads(manifest_path.read_text())
        manifest["stage"], manifest["fingerprint"], manifest["history"]
    except (ValueError, KeyError, TypeError):
        raise QtoolError(f"{manifest_path} is corrupt; delete the stage directory and run the stage again") from None
    if manifest.get("format") != FORMAT:
        raise QtoolError(
            f"{path} was written by an incompatible qtool (format {manifest.get('format')}, need {FORMAT}); "
            "re-create it"
        )
    return StageDir(path, manifest)


def stage_fingerprint(stage: str, params: dict, parent: StageDir) -> str:
    return _digest({"stage": stage, "params": params, "parent": parent.fingerprint, "format": FORMAT})


def is_complete(out: Path, fingerprint: str) -> bool:
    """True when `out` already holds this exact stage (same inputs and parameters)."""
    try:
        stage = open_stage(out) if out.is_dir() else None
    except QtoolError:
        return False
    return bool(stage and stage.manifest and stage.fingerprint == fingerprint)


# -- writing --------------------------------------------------------------------------------------


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@dataclass
class StageWriter:
    """Build a stage in a temporary directory; `commit()` renames it into place."""

    out: Path
    stage: str
    params: dict
    parent: StageDir
    spec: str | None = None
    metrics: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    inherit_tensors: bool = True  # False: start from the parent's config and tokenizer only

    def __post_init__(self):
        self.out = Path(self.out)
        self.fingerprint = stage_fingerprint(self.stage, self.params, self.parent)
        self.tmp = self.out.with_name(f".{self.out.name}.tmp-{os.getpid()}")
        self.started = time.time()

    def __enter__(self) -> "StageWriter":
        if self.out.resolve() == self.parent.path.resolve():
            raise QtoolError(f"output {self.out} is the input directory; choose another --out")
        if self.out.exists() and not (self.out / MANIFEST).exists():
            raise QtoolError(f"{self.out} exists and is not a qtool stage; choose another --out or remove it")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        for src in self.parent.path.iterdir():
            if src.is_file() and src.name != MANIFEST:
                # only tensor files are shared (and always unlinked before being replaced); small
                # files such as config.json are copied, so writing them can never reach the parent
                if src.suffix == ".safetensors" or src.name.endswith(".safetensors.index.json"):
                    if self.inherit_tensors:
                        _link_or_copy(src, self.tmp / src.name)
                else:
                    shutil.copy2(src, self.tmp / src.name)
        return self

    def save_model(self, model, tokenizer=None) -> None:
        """Replace the inherited float weights (unlinking first: the parent's files share inodes)."""
        for pattern in WEIGHT_PATTERNS:
            for f in self.tmp.glob(pattern):
                f.unlink()
        model.save_pretrained(self.tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.tmp)

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        path = self.tmp / f"{STAGE_PREFIX}{name}.safetensors"
        if path.exists():
            path.unlink()
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path)

    def commit(self) -> StageDir:
        history = list(self.parent.manifest["history"]) if self.parent.manifest else []
        entry = {"stage": self.stage, "params": self.params, "spec": self.spec, "fingerprint": self.fingerprint}
        manifest = {
            "format": FORMAT,
            "qtool_version": __version__,
            "stage": self.stage,
            "spec": self.spec,
            "fingerprint": self.fingerprint,
            "parent": {"path": str(self.parent.path), "fingerprint": self.parent.fingerprint},
            "params": self.params,
            "metrics": self.metrics,
            "timings": {**self.timings, "total_s": round(time.time() - self.started, 3)},
            "history": history + [entry],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        trash = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
        if self.out.exists():
            os.replace(self.out, trash)
        os.replace(self.tmp, self.out)
        shutil.rmtree(trash, ignore_errors=True)
        return StageDir(self.out, manifest)

    def __exit__(self, exc_type, exc, tb) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


class BlockJournal:
    """Per-block results of an unfinished stage, kept beside its target so a rerun resumes.

    A journal written for other inputs or parameters (another fingerprint) is discarded.
    """

    def __init__(self, out: Path, fingerprint: str):
        self.dir = Path(out).with_name(f".{Path(out).name}.partial")
        meta = self.dir / "journal.json"
        if self.dir.exists():
            try:
                same = json.loads(meta.read_text())["fingerprint"] == fingerprint
            except (OSError, ValueError, KeyError):
                same = False
            if not same:
                shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        meta.write_text(json.dumps({"fingerprint": fingerprint}))

    def _file(self, block: int) -> Path:
        return self.dir / f"block-{block:04d}.safetensors"

    def load(self, block: int) -> dict[str, torch.Tensor] | None:
        path = self._file(block)
        if not path.exists():
            return None
        try:
            return load_tensors(path)
        except QtoolError:
            return None  # a block cut off mid-write is simply redone

    def save(self, block: int, tensors: dict[str, torch.Tensor]) -> None:
        tmp = self.dir / f".block-{block:04d}.tmp"
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
        os.replace(tmp, self._file(block))

    def latest(self) -> tuple[int, dict[str, torch.Tensor]] | None:
        """The highest-numbered readable entry (for stages that journal steps, not blocks)."""
        for path in sorted(self.dir.glob("block-*.safetensors"), reverse=True):
            index = int(path.stem.split("-")[1])
            tensors = self.load(index)
            if tensors is not None:
                return index, tensors
        return None

    def prune(self, keep: int) -> None:
        """Delete every entry but `keep` (a step journal needs only its newest checkpoint)."""
        for path in self.dir.glob("block-*.safetensors"):
            if int(path.stem.split("-")[1]) != keep:
                path.unlink()

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
