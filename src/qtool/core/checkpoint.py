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

import contextlib
import errno
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qtool.core import __version__
from qtool.core.errors import QtoolError
from qtool.core.paths import cache_dir

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


_HASHES: dict[tuple, str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, cached (in memory and under the qtool cache dir) by the file's
    path, device, inode, size and modification time, so an unchanged file is hashed once."""
    st = path.stat()
    key = (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _HASHES:
        return _HASHES[key]
    entry = cache_dir() / "hashes" / hashlib.sha256(repr(key).encode()).hexdigest()[:32]
    try:
        digest = entry.read_text().strip()
    except OSError:
        digest = ""
    if len(digest) != 64:
        h = hashlib.sha256()
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
        digest = h.hexdigest()
        with contextlib.suppress(OSError):  # the cache is an optimisation only
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
            tmp.write_text(digest)
            os.replace(tmp, entry)
    _HASHES[key] = digest
    return digest


def model_fingerprint(path: Path) -> str:
    """Identity of a plain model directory by content: its config.json and the sha256 of every
    weight file (so a copy of the model has the same identity, and new values at the same path a
    new one). File hashes are cached by (path, inode, size, mtime)."""
    files = sorted(p for pattern in WEIGHT_PATTERNS for p in path.glob(pattern))
    return _digest([(path / "config.json").read_text(), [(f.name, f.stat().st_size, file_sha256(f)) for f in files]])


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


# -- owners of temporary directories -------------------------------------------------------------
#
# A temporary stage `.<out>.tmp-<pid>/` holds an owner file naming the process that writes it (pid,
# host, boot id, process start time); the journal `.<out>.partial/journal.json` holds the same
# record. A later run writing the same target removes the temporaries of owners that are gone.

OWNER = ".qtool-owner"
DISK_HINT = "choose another --out"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state first), None where unreadable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _start_time(pid: int) -> str:
    fields = _proc_stat(pid)
    return fields[19] if fields and len(fields) > 19 else ""


def owner_record() -> dict:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "boot": _boot_id(), "start": _start_time(pid)}


def owner_alive(owner: dict) -> bool:
    """Whether the process that wrote `owner` may still be running. An owner on another host counts
    as alive (it cannot be checked from here); on this host a pid that is gone, a zombie, or a pid
    since reused by another process (other boot or start time) counts as dead."""
    try:
        pid = int(owner["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    if owner.get("host", socket.gethostname()) != socket.gethostname():
        return True
    if owner.get("boot") and _boot_id() and owner["boot"] != _boot_id():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    fields = _proc_stat(pid)
    if fields is not None and fields[0] in ("Z", "X"):
        return False
    return not (owner.get("start") and fields is not None and _start_time(pid) != owner["start"])


def _read_owner(path: Path) -> dict | None:
    try:
        owner = json.loads(path.read_text())
        return owner if isinstance(owner, dict) else None
    except (OSError, ValueError):
        return None


def remove_stale(out: Path) -> list[Path]:
    """Remove the temporaries of dead runs that wrote `out` (`.<out>.tmp-<pid>`, `.<out>.old-<pid>`);
    nothing else is touched. Returns what was removed."""
    out = Path(out)
    removed = []
    if not out.name or not out.parent.is_dir():
        return removed
    for kind in ("tmp", "old"):
        for path in out.parent.glob(f".{glob.escape(out.name)}.{kind}-*"):
            match = re.fullmatch(rf"\.{re.escape(out.name)}\.{kind}-(\d+)", path.name)
            if not match or not path.is_dir() or int(match[1]) == os.getpid():
                continue
            owner = _read_owner(path / OWNER) or {"pid": int(match[1])}
            if not owner_alive(owner):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


# -- disk errors ------------------------------------------------------------------------------------


class DiskError(QtoolError):
    """Writing failed for a reason outside qtool (disk full, read-only, permission denied); a rerun
    after it is fixed resumes from the journal, so the journal is kept."""


_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _os_errno(exc: BaseException) -> int | None:
    """The errno of an OSError, or of a safetensors error that wraps one ('(os error 28)')."""
    if isinstance(exc, OSError):
        return exc.errno
    if type(exc).__name__ == "SafetensorError":
        match = re.search(r"\(os error (\d+)\)", str(exc))
        return int(match[1]) if match else None
    return None


def disk_error(exc: BaseException, target: Path, hint: str = DISK_HINT) -> DiskError | None:
    """The one-line error (ending in `hint`) for an OSError while writing `target`, None for other errors."""
    code = _os_errno(exc)
    if code not in _DISK_ERRNOS:
        return None
    if code in (errno.ENOSPC, errno.EDQUOT):
        return DiskError(f"disk full while writing {target}: free space or {hint}")
    where = Path(getattr(exc, "filename", None) or target)
    where = where if where.is_dir() else where.parent
    why = "read-only file system" if code == errno.EROFS else "permission denied"
    return DiskError(f"cannot write to {where} ({why}): {hint}")


@contextlib.contextmanager
def disk_errors(target: Path, hint: str = DISK_HINT):
    """Turn disk-full / read-only / permission errors into one-line DiskErrors naming `target`."""
    try:
        yield
    except Exception as exc:
        mapped = disk_error(exc, target, hint)
        if mapped is None:
            raise
        raise mapped from None


def keeps_journal(exc: BaseException) -> bool:
    """Whether a run that failed with `exc` keeps its journal: yes for a crash, a kill or Ctrl-C and
    for disk errors (a rerun resumes from it), no for qtool's own refusals (a rerun with the same
    parameters would fail the same way, e.g. a diverging train-blockap)."""
    return not isinstance(exc, QtoolError) or isinstance(exc, DiskError)


# -- output paths -----------------------------------------------------------------------------------


def _check_target(out: Path, parent: StageDir) -> None:
    """The refusals StageWriter also makes on its own: the input directory, a file, a directory of
    other files."""
    if out.resolve() == parent.path.resolve():
        raise QtoolError(f"output {out} is the input directory; choose another --out")
    if out.exists() and not out.is_dir():
        raise QtoolError(f"{out} is a file, not a directory; choose another --out")
    if out.is_dir() and not (out / MANIFEST).exists() and any(out.iterdir()):
        raise QtoolError(f"{out} exists and is not a qtool stage; choose another --out or remove it")


def _nearest_dir(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: Path, hint: str = DISK_HINT) -> None:
    """Refuse, in one line ending in `hint`, a place where nothing can be created: the nearest
    existing directory at or above `path` is probed with a file, which is removed again (nothing
    else is created)."""
    base = _nearest_dir(Path(path))
    if not base.is_dir():
        raise QtoolError(f"{base} is a file, not a directory; {hint}")
    probe = base / f".qtool-probe-{os.getpid()}"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.unlink(probe)
    except OSError as exc:
        with contextlib.suppress(OSError):
            probe.unlink()
        why = {errno.EROFS: "read-only file system", errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded"}
        why = why.get(exc.errno, "permission denied" if exc.errno in (errno.EACCES, errno.EPERM) else exc.strerror)
        raise QtoolError(f"cannot write to {base} ({why}): {hint}") from None


def check_output(out: Path | str, parent: StageDir, force: bool, fingerprint: str | None = None) -> None:
    """Refuse a bad output path before any work, with one line: empty, a file, a directory of other
    files, the input directory, another qtool stage (unless `force`; a stage holding `fingerprint`
    is the complete case and passes), or a place that cannot be written (probed with a file). Also
    removes temporaries that dead runs left for this target."""
    if out is None or not str(out).strip():
        raise QtoolError("--out is empty: give the directory to write the stage to")
    out = Path(str(out)).expanduser()
    _check_target(out, parent)
    if (out / MANIFEST).is_file() and not force:
        try:
            held = open_stage(out)
        except QtoolError:
            held = None
        if held is None or held.fingerprint != fingerprint:
            what = f"a '{held.name}' stage" if held else "a qtool stage that is corrupt or from an incompatible qtool"
            raise QtoolError(
                f"{out} already holds {what} for other inputs; choose another --out or pass --force to replace it"
            )
    check_writable(out.parent)
    remove_stale(out)


# -- writing --------------------------------------------------------------------------------------


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _missing_dirs(path: Path) -> list[Path]:
    """`path`'s ancestors that do not exist yet, outermost first."""
    missing = []
    path = path.absolute()
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing[::-1]


@dataclass
class StageWriter:
    """Build a stage in a temporary directory; `commit()` renames it into place. Any failure (also
    while copying the parent's files, also Ctrl-C) removes the temporary directory and the parent
    directories it created; disk errors become one-line DiskErrors."""

    out: Path
    stage: str
    params: dict
    parent: StageDir
    spec: str | None = None
    metrics: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    inherit_tensors: bool = True  # False: start from the parent's config and tokenizer only
    world_size: int = 1  # processes of the run that computed the stage (torch.distributed ranks)

    def __post_init__(self):
        self.out = Path(self.out)
        self.fingerprint = stage_fingerprint(self.stage, self.params, self.parent)
        self.tmp = self.out.with_name(f".{self.out.name}.tmp-{os.getpid()}")
        self.started = time.time()
        self._made: list[Path] = []

    def __enter__(self) -> "StageWriter":
        _check_target(self.out, self.parent)
        remove_stale(self.out)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._made = _missing_dirs(self.out.parent)
        try:
            with disk_errors(self.out):
                self.tmp.mkdir(parents=True)
                (self.tmp / OWNER).write_text(json.dumps(owner_record()))
                for src in self.parent.path.iterdir():
                    if src.is_file() and src.name != MANIFEST:
                        # only tensor files are shared (and always unlinked before being replaced); small
                        # files such as config.json are copied, so writing them can never reach the parent
                        if src.suffix == ".safetensors" or src.name.endswith(".safetensors.index.json"):
                            if self.inherit_tensors:
                                _link_or_copy(src, self.tmp / src.name)
                        else:
                            shutil.copy2(src, self.tmp / src.name)
        except BaseException:
            self._cleanup()
            raise
        return self

    def _cleanup(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        for path in reversed(self._made):
            with contextlib.suppress(OSError):
                path.rmdir()  # only while empty: never what another run put there

    def save_model(self, model, tokenizer=None) -> None:
        """Replace the inherited float weights (unlinking first: the parent's files share inodes)."""
        with disk_errors(self.out):
            for pattern in WEIGHT_PATTERNS:
                for f in self.tmp.glob(pattern):
                    f.unlink()
            model.save_pretrained(self.tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(self.tmp)

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        path = self.tmp / f"{STAGE_PREFIX}{name}.safetensors"
        with disk_errors(self.out):
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
            "world_size": self.world_size,
            "history": history + [entry],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        trash = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
        with disk_errors(self.out):
            (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
            (self.tmp / OWNER).unlink(missing_ok=True)
            if self.out.exists():
                os.replace(self.out, trash)
            try:
                os.replace(self.tmp, self.out)
            except BaseException:
                if trash.exists() and not self.out.exists():
                    os.replace(trash, self.out)  # put the old stage back
                raise
        self._made = []
        shutil.rmtree(trash, ignore_errors=True)
        return StageDir(self.out, manifest)

    def __exit__(self, exc_type, exc, tb) -> None:
        self._cleanup()
        if exc is not None:
            mapped = disk_error(exc, self.out)  # e.g. a stage writing into `tmp` itself
            if mapped is not None:
                raise mapped from None


class BlockJournal:
    """Per-block results of an unfinished stage, kept beside its target so a rerun resumes.

    A journal written for other inputs or parameters (another fingerprint) is discarded; one that a
    live run is writing is refused. `journal.json` names the owner (pid, host, start time).
    """

    def __init__(self, out: Path, fingerprint: str):
        self.out = Path(out)
        self.dir = self.out.with_name(f".{self.out.name}.partial")
        meta = self.dir / "journal.json"
        with disk_errors(self.out):
            if self.dir.exists():
                try:
                    saved = json.loads(meta.read_text())
                    same = saved["fingerprint"] == fingerprint
                    owner = saved.get("owner")
                except (OSError, ValueError, KeyError, TypeError):
                    same, owner = False, None
                if isinstance(owner, dict) and owner.get("pid") != os.getpid() and owner_alive(owner):
                    raise QtoolError(
                        f"{self.out} is being written by another qtool run (pid {owner.get('pid')} on "
                        f"{owner.get('host')}); wait for it to finish or choose another --out"
                    )
                if not same:
                    shutil.rmtree(self.dir)
            made = _missing_dirs(self.dir)
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                meta.write_text(json.dumps({"fingerprint": fingerprint, "owner": owner_record()}))
            except BaseException:
                shutil.rmtree(self.dir, ignore_errors=True)
                for path in reversed(made[:-1]):
                    with contextlib.suppress(OSError):
                        path.rmdir()
                raise

    @classmethod
    def reading(cls, out: Path) -> "BlockJournal":
        """A view of the journal of `out` that only reads entries (the other ranks of a distributed
        run, while rank 0 owns and writes the journal)."""
        view = object.__new__(cls)
        view.out = Path(out)
        view.dir = view.out.with_name(f".{view.out.name}.partial")
        return view

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
        try:
            with disk_errors(self.out):
                save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
                os.replace(tmp, self._file(block))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

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

    def empty(self) -> bool:
        """True while no block or step has been saved (a rerun has nothing to resume from)."""
        return not any(self.dir.glob("block-*.safetensors"))

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
