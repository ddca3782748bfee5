"""Issue 23's 40 hostile inputs, one row each, through the real command line (`qtool.cli.main`, in
process) on the tiny random llama.

Every refusal row asserts the exit code (2), the exact one `error:` line (no traceback) and that
the disk is unchanged: every file under the test's directory (model, data, outputs, workdirs,
mounts, the qtool cache) keeps its size, modification time and sha256, and nothing appears or
disappears (the cache's content-addressed memos of file hashes and token ids excepted: any read
writes those). Rows whose command succeeds (a killed run's leftovers removed by the next run)
check what they wrote instead. `never` names work that must not start: the refusal comes first.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import tmpfs
from qtool.cli import main

SRC = Path(__file__).resolve().parents[1] / "src"
SUPPORTED = "qtool supports llama, mistral, opt, qwen2"
SPEC_HELP = "expected e.g. W4A16-g128, W4A4, W8A8-tensor, W4A16KV4, W2*A8-g64"
OTHER_STAGE = "{o} already holds a '{held}' stage for other inputs; choose another --out or pass --force to replace it"
TEXT = "The quick brown fox jumps over the lazy dog while the cat sleeps by the warm fire. " * 40
MEMOS = ("hashes", "tokens")  # cache folders of content-addressed memos (file hashes, token ids)


@dataclass
class World:
    """The test's directory: the model, a small data file, the output path, the cache."""

    root: Path
    model: Path
    data: Path
    out: Path | str
    cache: Path
    extra: dict = field(default_factory=dict)

    def fmt(self, text: str) -> str:
        return text.format(m=self.model, o=self.out, r=self.root, d=self.data, **self.extra)


def invoke(args) -> int:
    """Run the CLI in process; its exit code."""
    saved = sys.argv
    sys.argv = ["qtool", *map(str, args)]
    try:
        main()
        return 0
    except SystemExit as exc:
        return exc.code or 0
    finally:
        sys.argv = saved


def snapshot(w: World) -> dict[str, tuple | None]:
    """Every path under the test's directory: files as (size, mtime, sha256), folders as None."""
    state = {}
    for path in sorted(w.root.rglob("*")):
        rel = path.relative_to(w.root)
        if rel.parts[0] == w.cache.name and (len(rel.parts) == 1 or rel.parts[1] in MEMOS):
            continue  # the cache folder itself is made by its memos
        if path.is_file() and not path.is_symlink():
            st = path.stat()
            state[str(rel)] = (st.st_size, st.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
        else:
            state[str(rel) + "/"] = None
    return state


def _edit_config(m: Path, **changes) -> None:
    config = json.loads((m / "config.json").read_text())
    config.update({k: v for k, v in changes.items() if v is not None})
    for key in [k for k, v in changes.items() if v is None]:
        del config[key]
    (m / "config.json").write_text(json.dumps(config))


class _Trap:
    """Unpickling this touches a marker file: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


# -- commands (tiny settings: 2 windows of 16 tokens of a small text file, one epoch) ---------------

SMALL = ["--data", "{d}", "--samples", "2", "--seqlen", "16", "--device", "cpu"]
CMD = {
    "eval": ["eval", "{m}", "--data", "{d}", "--seqlen", "16", "--windows", "2", "--device", "cpu"],
    "calibrate": ["calibrate", "{m}", "-o", "{o}", *SMALL],
    "pack": ["pack", "{m}", "-o", "{o}", "--spec", "W4A16-g32"],
    "memory": ["memory", "{m}"],
    "generate": ["generate", "{m}", "--prompt", "hello", "--max-new-tokens", "2", "--device", "cpu"],
    "train-blockap": ["train-blockap", "{m}", "-o", "{o}", "--spec", "W4A16-g32", "--epochs", "1", *SMALL],
    "tune-e2e": ["tune-e2e", "{m}", "-o", "{o}", "--spec", "W4A16-g32", "--grad-accum", "1", *SMALL],
    "run": ["run", "{r}/recipe.yaml", "--device", "cpu"],
}
WORK = {  # what a command does once its checks pass: a refusal row asserts none of it ran
    "eval": "qtool.stages.eval:Evaluate.work",
    "calibrate": "qtool.stages.calibrate:Calibrate.work",
    "pack": "qtool.stages.pack:Pack.work",
    "train-blockap": "qtool.stages.train_blockap:TrainBlockAP.work",
    "tune-e2e": "qtool.stages.tune_e2e:TuneE2E.work",
    "generate": "qtool.runtime.loader:load",
    "memory": "qtool.metrics.memory:memory_report",
}


def cmd(name: str, *more: str) -> list[str]:
    return [*CMD[name], *more]


# -- setups -------------------------------------------------------------------------------------------


def not_json(w: World, mp) -> None:
    (w.model / "config.json").write_text('{\n  "model_type": "llama"\n  "hidden_size": 64\n}')


def no_model_type(w: World, mp) -> None:
    _edit_config(w.model, model_type=None)


def sizes_disagree(w: World, mp) -> None:
    _edit_config(w.model, hidden_size=128)


def custom_code(w: World, mp) -> None:
    _edit_config(w.model, auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    (w.model / "modeling_evil.py").write_text(f"open({str(w.root / 'code-ran')!r}, 'w')\n")


def pickle_beside_stray_safetensors(w: World, mp) -> None:
    (w.model / "model.safetensors").rename(w.model / "stray.safetensors")
    (w.model / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(w.root / "unpickled")))


def packed_model(w: World, mp) -> None:
    """The model is a packed checkpoint (`qtool pack` output)."""
    packed = w.root / "packed"
    assert invoke(["pack", w.model, "-o", packed, "--spec", "W4A16-g32"]) == 0
    w.model = packed


def long_prompt(w: World, mp) -> None:
    from qtool.models.loading import load_tokenizer

    prompt = "hello " * 2800
    w.extra.update(prompt=prompt, n=len(load_tokenizer(w.model)(prompt).input_ids))


def out_empty(w: World, mp) -> None:
    w.out = ""  # what `-o ""` gives


def out_is_file(w: World, mp) -> None:
    w.out.write_text("my notes")


def out_holds_files(w: World, mp) -> None:
    w.out.mkdir()
    (w.out / "notes.txt").write_text("my notes")


def on_mount(options: str) -> Callable:
    """The output (and a recipe's workdir) on a tmpfs mounted with `options`."""

    def setup(w: World, mp) -> None:
        w.extra["mount"] = options
        w.out = w.root / "fs" / "out"

    return setup


def other_stage(w: World, mp) -> None:
    """The output already holds a pack stage."""
    assert invoke([w.fmt(a) for a in CMD["pack"]]) == 0
    w.extra["held"] = "pack"


def replaced_with_force(w: World, before: dict, after: dict) -> None:
    from qtool.core.checkpoint import open_stage

    assert invoke([*(w.fmt(a) for a in CMD["calibrate"]), "--force"]) == 0
    assert open_stage(w.out).name == "calibrate" and open_stage(w.out).stages == ["calibrate"]
    assert not [p.name for p in w.root.iterdir() if p.name.startswith(".")]


def data_changed(w: World, mp) -> None:
    """A complete calibrate stage, then new text in its data file at the same path."""
    assert invoke([w.fmt(a) for a in CMD["calibrate"]]) == 0
    st = w.data.stat()
    w.data.write_text(TEXT.replace("fox", "owl"))  # same size, and the old modification time back
    os.utime(w.data, ns=(st.st_atime_ns, st.st_mtime_ns))
    w.extra["held"] = "calibrate"


def redone_with_force(w: World, before: dict, after: dict) -> None:
    from qtool.core.checkpoint import open_stage
    from qtool.core.data import data_fingerprint

    assert invoke([*(w.fmt(a) for a in CMD["calibrate"]), "--force"]) == 0
    assert open_stage(w.out).manifest["params"]["data_sha"] == data_fingerprint(str(w.data))


def diverges(w: World, mp) -> None:
    """The block loss jumps to 1000x its first value on the second step (2 windows, batch 1)."""
    from qtool.quant.block_losses import MSELoss

    values = iter([1.0, 1000.0])
    mp.setattr(MSELoss, "__call__", lambda self, out, targets: out.float().mean() * 0 + next(values))


def recipe(steps: str, model: str = "{m}") -> Callable:
    def setup(w: World, mp) -> None:
        workdir = w.root / "fs" / "work" if "mount" in w.extra else w.root / "work"
        w.extra["workdir"] = workdir
        (w.root / "recipe.yaml").write_text(f"model: {w.fmt(model)}\nworkdir: {workdir}\nsteps:\n{w.fmt(steps)}")

    return setup


def both(*setups: Callable) -> Callable:
    def setup(w: World, mp) -> None:
        for s in setups:
            s(w, mp)

    return setup


# -- kill -9: a real SIGKILL in a subprocess at a chosen point, then the next run ----------------------

_KILLED = r"""
import os, signal, sys
from qtool.core import checkpoint
where = sys.argv[1]
if where == "pack":  # the packed weights written into the temporary directory, not yet committed
    import qtool.stages.pack as stage
    real = stage.save_packed
    def save_packed(*args, **kwargs):
        real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
    stage.save_packed = save_packed
else:  # the journal holds `where` steps or blocks
    real = checkpoint.BlockJournal.save
    def save(self, index, tensors):
        real(self, index, tensors)
        if index == int(where):
            os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.BlockJournal.save = save
sys.argv = ["qtool", *sys.argv[2:]]
from qtool.cli import main
main()
"""


def kill9(w: World, args: list[str], where: str) -> None:
    """Run `args` in a subprocess that SIGKILLs itself at `where`."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "QTOOL_CACHE": str(w.cache), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", _KILLED, where, *args], env=env, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def leftovers(w: World) -> set[str]:
    """The temporary and journal directories beside the output."""
    return {p.name for p in w.out.parent.iterdir() if p.name.startswith(f".{w.out.name}.")}


def killed(args: list[str], where: str, kinds: set[str]) -> Callable:
    """An uninterrupted reference run of `args` to `ref`, then the same run killed -9 at `where`,
    which leaves `kinds` of directories beside the output (tmp: `.NAME.tmp-PID`, partial: the journal)."""

    def setup(w: World, mp) -> None:
        run = [w.fmt(a) for a in args]
        assert invoke([w.root / "ref" if a == str(w.out) else a for a in run]) == 0
        kill9(w, run, where)
        w.extra["leftovers"] = leftovers(w)
        assert {name.rsplit(".", 1)[1].split("-")[0] for name in w.extra["leftovers"]} == kinds, w.extra["leftovers"]
        if args[0] == "train-blockap":  # record which blocks the rerun trains: only those after `where`
            from qtool.quant import blockwise_train

            real, w.extra["trained"] = blockwise_train.fit_block, []
            mp.setattr(blockwise_train, "fit_block", lambda *a, **k: w.extra["trained"].append(a[9]) or real(*a, **k))

    return setup


def same_as_uninterrupted(w: World, before: dict, after: dict) -> None:
    """The rerun removed the dead run's leftovers and wrote exactly what an uninterrupted run writes."""
    left = {p.name for p in w.root.iterdir() if p.name.startswith(".")}
    assert left == set(), left
    if "trained" in w.extra:
        assert w.extra["trained"] == [2], w.extra["trained"]  # blocks 0 and 1 came from the journal
    gone = {k for k in before if k.split("/")[0] in w.extra["leftovers"]}
    made = {k for k in after if k.split("/")[0] == w.out.name}
    assert set(after) == (set(before) - gone) | made
    assert {k: before[k] for k in set(before) - gone} == {k: after[k] for k in set(before) - gone}
    ref = w.root / "ref"
    assert sorted(p.name for p in w.out.iterdir()) == sorted(p.name for p in ref.iterdir())
    for path in ref.iterdir():
        if path.name != "qtool.json":
            assert path.read_bytes() == (w.out / path.name).read_bytes(), path.name
    manifest = [json.loads((d / "qtool.json").read_text()) for d in (ref, w.out)]
    for m in manifest:
        del m["timings"], m["created"]
    assert manifest[0] == manifest[1]


# -- the table ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    kind: str  # the heading: traceback, wrong (silently accepted) or leftover
    args: list[str]  # formatted with the World: {m} model, {o} out, {d} data, {r} the test's directory
    message: str | None  # the exact text after "error: " (formatted); None: the command succeeds
    setup: Callable | None = None  # (world, monkeypatch): builds the hostile input
    never: tuple[str, ...] = ()  # "module:attr" that must not run
    check: Callable | None = None  # (world, before, after): more assertions after the standard ones
    chatter: bool = False  # the command prints progress before it fails (the error is still one line, last)


NOT_JSON = "{m}/config.json is not valid JSON (line 3: Expecting ',' delimiter); fix or replace it"
NO_MODEL_TYPE = f"{{m}}/config.json has no model_type; set it to the model's family ({SUPPORTED})"
READ_ONLY = "cannot write to {r}/fs (read-only file system): choose another --out"
DISK_FULL = "disk full while writing {o}: free space or choose another --out"
PACKED = "{m} is a packed checkpoint; train the stage it was packed from"

CASES = [
    # -- tracebacks before (transformers' OSError / ValueError, AdamW's ValueError, OSError errno 30 / 28)
    *(
        Case(f"config-not-json-{c}", "traceback", cmd(c), NOT_JSON, not_json, (WORK[c],))
        for c in ("eval", "calibrate", "memory", "generate", "pack")
    ),
    *(
        Case(f"config-no-model-type-{c}", "traceback", cmd(c), NO_MODEL_TYPE, no_model_type, (WORK[c],))
        for c in ("eval", "calibrate", "memory", "generate", "pack")
    ),
    Case(
        "config-sizes-disagree",
        "traceback",
        cmd("eval"),
        "{m}/model.safetensors: model.embed_tokens.weight is [49152, 64] but config.json implies [49152, 128]; "
        "the config does not match the weights: restore the config.json they were saved with",
        sizes_disagree,
        (WORK["eval"],),
    ),
    Case(
        "tune-e2e-lr-negative",
        "traceback",
        cmd("tune-e2e", "--lr", "-1"),
        "--lr must be > 0.0, got -1.0",
        never=(WORK["tune-e2e"],),
    ),
    Case(
        "tune-e2e-weight-decay-negative",
        "traceback",
        cmd("tune-e2e", "--weight-decay", "-5"),
        "--weight-decay must be >= 0.0, got -5.0",
        never=(WORK["tune-e2e"],),
    ),
    Case(
        "out-empty",
        "traceback",
        cmd("calibrate"),
        "--out is empty: give the directory to write the stage to",
        out_empty,
        (WORK["calibrate"],),
    ),
    *(
        Case(f"readonly-out-{c}", "traceback", cmd(c), READ_ONLY, on_mount("size=1m,ro"), (WORK[c],))
        for c in ("calibrate", "pack", "train-blockap")
    ),
    Case(
        "readonly-out-run",
        "traceback",
        cmd("run"),
        "cannot write to {r}/fs (read-only file system): set another workdir in the recipe",
        both(on_mount("size=1m,ro"), recipe("  - calibrate: {{samples: 2, seqlen: 16, data: {d}}}\n")),
        (WORK["calibrate"],),
    ),
    # the tokenizer (3.4 MB) fits but not the packed weights (25 MB): disk full while saving them
    Case("diskfull-pack", "traceback", cmd("pack"), DISK_FULL, on_mount("size=8m")),
    # not even the tokenizer fits: disk full while copying the parent's files (StageWriter.__enter__)
    Case("diskfull-calibrate", "traceback", cmd("calibrate"), DISK_FULL, on_mount("size=1m")),
    Case(
        "config-auto-map",
        "traceback",
        cmd("calibrate"),
        "{m} uses custom model code (auto_map); qtool never runs code from a model directory",
        custom_code,
        (WORK["calibrate"],),
    ),
    Case("packed-into-tune-e2e", "traceback", cmd("tune-e2e"), PACKED, packed_model, (WORK["tune-e2e"],)),
    Case(
        "packed-into-train-blockap", "traceback", cmd("train-blockap"), PACKED, packed_model, (WORK["train-blockap"],)
    ),
    # -- wrong or silently accepted before
    Case(
        "spec-g0",
        "wrong",
        cmd("eval", "--spec", "W4A16-g0"),
        f"invalid quantization spec 'W4A16-g0': group size must be >= 1, got 'g0'; {SPEC_HELP}",
        never=(WORK["eval"],),
    ),
    Case(
        "spec-empty", "wrong", cmd("eval", "--spec", ""), f"empty quantization spec; {SPEC_HELP}", never=(WORK["eval"],)
    ),
    Case(
        "spec-sym-sym",
        "wrong",
        cmd("eval", "--spec", "W4A16-sym-sym"),
        f"invalid quantization spec 'W4A16-sym-sym': 'sym' repeats the sym (sym); {SPEC_HELP}",
        never=(WORK["eval"],),
    ),
    Case(
        "tune-e2e-max-grad-norm-negative",
        "wrong",
        cmd("tune-e2e", "--max-grad-norm", "-1"),
        "--max-grad-norm must be > 0.0, got -1.0",
        never=(WORK["tune-e2e"],),
    ),
    Case(
        "tune-e2e-warmup-ratio-5",
        "wrong",
        cmd("tune-e2e", "--warmup-ratio", "5"),
        "--warmup-ratio must be >= 0.0 and <= 1.0, got 5.0",
        never=(WORK["tune-e2e"],),
    ),
    Case(
        "calibrate-onto-other-stage",
        "wrong",
        cmd("calibrate"),
        OTHER_STAGE,
        other_stage,
        (WORK["calibrate"],),
        check=replaced_with_force,
    ),
    Case(
        "bin-beside-stray-safetensors",
        "wrong",
        cmd("eval"),
        "{m} holds pickle weights (pytorch_model.bin); convert to safetensors (save_pretrained in a trusted "
        "environment) and remove them: qtool never loads pickle",
        pickle_beside_stray_safetensors,
        (WORK["eval"],),
    ),
    Case(
        "generate-long-prompt",
        "wrong",
        ["generate", "{m}", "--prompt", "{prompt}", "--max-new-tokens", "2", "--device", "cpu"],
        "prompt is {n} tokens + 2 new > the model's context 2048; shorten the prompt or lower --max-new-tokens",
        long_prompt,
        (WORK["generate"],),
    ),
    Case(
        "data-changed-same-path",
        "wrong",
        cmd("calibrate"),
        OTHER_STAGE,
        data_changed,
        (WORK["calibrate"],),
        check=redone_with_force,
    ),
    # -- leftovers before
    Case(
        "train-blockap-diverges",
        "leftover",
        cmd("train-blockap"),
        "block 0: training loss diverged to 1000, 100x its first value 1 (epoch 1); lower the learning rates (--lr-*)",
        diverges,
        chatter=True,
    ),
    Case(
        "out-is-file-tune-e2e",
        "leftover",
        cmd("tune-e2e"),
        "{o} is a file, not a directory; choose another --out",
        out_is_file,
        (WORK["tune-e2e"],),
    ),
    Case(
        "out-holds-files-tune-e2e",
        "leftover",
        cmd("tune-e2e"),
        "{o} exists and is not a qtool stage; choose another --out or remove it",
        out_holds_files,
        (WORK["tune-e2e"],),
    ),
    Case(
        "recipe-samples-0",
        "leftover",
        cmd("run"),
        "recipe {r}/recipe.yaml: steps[0].calibrate: --samples must be >= 1, got 0",
        recipe("  - calibrate: {{samples: 0}}\n"),
        (WORK["calibrate"],),
    ),
    Case(
        "recipe-missing-model",
        "leftover",
        cmd("run"),
        "model '{r}/no-such-model' not found: no such directory, and not a known id (smollm2-135m) or hub id "
        "(org/name)",
        recipe("  - calibrate: {{samples: 2}}\n", model="{r}/no-such-model"),
        (WORK["calibrate"],),
    ),
    Case(
        "recipe-step1-bad-spec",
        "leftover",
        cmd("run"),
        f"recipe {{r}}/recipe.yaml: steps[1].eval: invalid quantization spec 'W4X4': cannot read 'W4X4'; {SPEC_HELP}",
        recipe("  - calibrate: {{samples: 2, seqlen: 16, data: {d}}}\n  - eval: {{spec: W4X4}}\n"),
        (WORK["calibrate"], WORK["eval"]),
    ),
    Case(
        "kill9-pack", "leftover", cmd("pack"), None, killed(cmd("pack"), "pack", {"tmp"}), check=same_as_uninterrupted
    ),
    Case(
        "kill9-train-blockap",
        "leftover",
        cmd("train-blockap"),
        None,
        killed(cmd("train-blockap"), "1", {"tmp", "partial"}),
        check=same_as_uninterrupted,
    ),
]
assert len(CASES) == 40 and len({c.id for c in CASES}) == 40


def _must_not_run(target: str):
    def refuse(*args, **kwargs):
        raise AssertionError(f"{target} ran: the input should have been refused before any work")

    return refuse


@pytest.fixture
def world(tmp_path, tiny_dir, monkeypatch) -> World:
    """The tiny llama (`tiny_dir` lives in tmp_path), a small data file and a cache of its own."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("QTOOL_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "calib.txt"
    data.write_text(TEXT)
    return World(root=tmp_path, model=tiny_dir, data=data, out=tmp_path / "out", cache=cache)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(case: Case, world: World, capsys, monkeypatch):
    with contextlib.ExitStack() as stack:
        if case.setup is not None:
            case.setup(world, monkeypatch)
        if "mount" in world.extra:
            stack.enter_context(tmpfs(world.root / "fs", world.extra["mount"]))
        capsys.readouterr()  # what the setup printed
        before = snapshot(world)
        with monkeypatch.context() as guard:
            for target in case.never:
                module, attr = target.split(":")
                owner, _, name = attr.rpartition(".")
                obj = __import__(module, fromlist=["_"])
                guard.setattr(getattr(obj, owner) if owner else obj, name, _must_not_run(target))
            code = invoke([world.fmt(a) for a in case.args])
        out, err = capsys.readouterr()
        after = snapshot(world)
        assert "Traceback" not in out + err
        lines = [line for line in err.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:")]
        if case.message is None:
            assert code == 0 and errors == [], err
        else:
            assert code == 2, err
            assert errors == [f"error: {world.fmt(case.message)}"], err
            assert lines[-1] == errors[0] and (case.chatter or len(lines) == 1), err
            assert after == before, {k for k in set(before) ^ set(after)} or "files changed"
        assert not (world.root / "code-ran").exists() and not (world.root / "unpickled").exists()
        if case.check is not None:
            case.check(world, before, after)


def test_kill9_then_resume_of_tune_e2e_is_bitwise_identical(world: World, capsys, monkeypatch):
    """tune-e2e journals its steps and opens its temporary directory only at the end: a kill -9 after
    step 1 leaves the journal alone, and the rerun resumes from it to the uninterrupted result (the
    kill -9 rows above do the same for pack and train-blockap)."""
    args = cmd("tune-e2e", "--save-every", "1", "--epochs", "2")  # 4 optimizer steps
    killed(args, "1", {"partial"})(world, monkeypatch)
    capsys.readouterr()
    before = snapshot(world)
    assert invoke([world.fmt(a) for a in args]) == 0
    assert "tune-e2e: resumed at step 1/4" in capsys.readouterr().err
    same_as_uninterrupted(world, before, snapshot(world))
