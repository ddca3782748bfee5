import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tmpfs
from qtool.core import checkpoint
from qtool.core.checkpoint import (
    OWNER,
    BlockJournal,
    DiskError,
    StageDir,
    StageWriter,
    check_output,
    check_safetensors,
    is_complete,
    keeps_journal,
    model_fingerprint,
    open_stage,
    owner_record,
    remove_stale,
)
from qtool.core.errors import QtoolError


def test_stage_is_atomic_and_links_parent_files(tiny_dir, tmp_path):
    parent = open_stage(tiny_dir)
    out = tmp_path / "stage"
    with StageWriter(out, "calibrate", {"a": 1}, parent) as writer:
        writer.save_tensors("calibrate", {"x": torch.arange(3.0)})
        assert not out.exists()  # nothing visible until commit
        stage = writer.commit()
    assert stage.name == "calibrate" and is_complete(out, writer.fingerprint)
    assert (
        os.path.samefile(out / "model.safetensors", tiny_dir / "model.safetensors")
        or (out / "model.safetensors").read_bytes() == (tiny_dir / "model.safetensors").read_bytes()
    )
    assert torch.equal(open_stage(out).tensors("calibrate")["x"], torch.arange(3.0))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_failed_stage_leaves_nothing_behind(tiny_dir, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(RuntimeError):
        with StageWriter(work / "stage", "calibrate", {}, open_stage(tiny_dir)):
            raise RuntimeError("boom")
    assert list(work.iterdir()) == []


def test_replacing_weights_never_writes_through_to_the_parent(tiny_dir, tmp_path):
    from qtool.models.loading import load_model

    before = (tiny_dir / "model.safetensors").read_bytes()
    model = load_model(tiny_dir)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with StageWriter(tmp_path / "s", "x", {}, open_stage(tiny_dir)) as writer:
        writer.save_model(model)
        writer.commit()
    assert (tiny_dir / "model.safetensors").read_bytes() == before
    assert (tmp_path / "s" / "model.safetensors").read_bytes() != before


def test_truncated_safetensors_is_detected(tiny_dir, tmp_path):
    path = tmp_path / "cut.safetensors"
    path.write_bytes((tiny_dir / "model.safetensors").read_bytes()[:-100])
    with pytest.raises(QtoolError, match="truncated or corrupt"):
        check_safetensors(path)
    path.write_bytes(b"\x00" * 4)
    with pytest.raises(QtoolError, match="truncated or corrupt"):
        check_safetensors(path)


def test_incompatible_or_corrupt_manifest(tiny_dir, tmp_path):
    stage = tmp_path / "s"
    with StageWriter(stage, "calibrate", {}, open_stage(tiny_dir)) as writer:
        writer.commit()
    manifest = json.loads((stage / "qtool.json").read_text())
    (stage / "qtool.json").write_text(json.dumps({**manifest, "format": 99}))
    with pytest.raises(QtoolError, match="incompatible"):
        open_stage(stage)
    (stage / "qtool.json").write_text("{not json")
    with pytest.raises(QtoolError, match="corrupt"):
        open_stage(stage)


def test_require_names_the_missing_stage(tiny_dir):
    with pytest.raises(QtoolError, match="needs a 'calibrate' stage, but .* is a plain model directory"):
        open_stage(tiny_dir).require("calibrate", "reorder")


def test_block_journal_discards_other_fingerprints(tmp_path):
    out = tmp_path / "stage"
    journal = BlockJournal(out, "aaa")
    journal.save(0, {"t": torch.ones(2)})
    assert torch.equal(BlockJournal(out, "aaa").load(0)["t"], torch.ones(2))
    assert BlockJournal(out, "bbb").load(0) is None


# -- leftovers, output paths, disk errors, content fingerprints -------------------------------------


def _tree(root: Path) -> list[str]:
    """Every path under `root` (to assert a failure changed nothing on disk)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _small_parent(tmp_path) -> StageDir:
    """A parent with only a config.json: cheap to copy onto a tiny file system."""
    parent = tmp_path / "small"
    parent.mkdir()
    (parent / "config.json").write_text('{"model_type": "llama"}')
    return StageDir(parent)


_HOLD_TMP = """
import sys, time
from pathlib import Path
from qtool.core.checkpoint import StageDir, StageWriter
writer = StageWriter(Path(sys.argv[1]), "calibrate", {}, StageDir(Path(sys.argv[2])))
writer.__enter__()
(writer.tmp / "big.bin").write_bytes(b"x" * 100_000)
print(writer.tmp, flush=True)
time.sleep(600)
"""


def test_killed_runs_tmp_is_removed_by_the_next_writer(tmp_path):
    parent = _small_parent(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    out = work / "stage"
    env = {**os.environ, "PYTHONPATH": str(Path(checkpoint.__file__).parents[2])}
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD_TMP, str(out), str(parent.path)], stdout=subprocess.PIPE, text=True, env=env
    )
    tmp = Path(proc.stdout.readline().strip())
    assert tmp.name == f".stage.tmp-{proc.pid}" and (tmp / OWNER).is_file()
    keep = [work / ".stage.tmp-1", work / ".other.tmp-99999999", work / ".stage-2.tmp-99999999", work / "x.tmp-1"]
    for path in keep:  # a live owner (pid 1), or other targets' names: never touched
        path.mkdir()
    with StageWriter(out, "calibrate", {}, parent):
        assert tmp.exists()  # the owner is alive: its tmp is left alone
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert tmp.exists()
    with StageWriter(out, "calibrate", {}, parent) as writer:
        assert not tmp.exists()
        writer.commit()
    assert sorted(p.name for p in work.iterdir()) == sorted(["stage", *(p.name for p in keep)])
    proc.stdout.close()


def test_stale_detection_by_owner_record(tmp_path):
    out = tmp_path / "stage"
    me = owner_record()

    def tmp_with(name, owner):
        path = tmp_path / name
        path.mkdir()
        if owner is not None:
            (path / OWNER).write_text(json.dumps(owner))
        return path

    parent_pid = os.getppid()
    live = tmp_with(f".stage.tmp-{parent_pid}", {**me, "pid": parent_pid, "start": checkpoint._start_time(parent_pid)})
    reused = tmp_with(".stage.tmp-1", {**me, "pid": 1, "start": "1"})  # pid 1 alive, but not that process
    other_host = tmp_with(".stage.tmp-2", {**me, "pid": 99999999, "host": "elsewhere"})
    rebooted = tmp_with(f".stage.tmp-{parent_pid + 0}0", {**me, "pid": parent_pid, "boot": "another-boot"})
    dead_old_style = tmp_with(".stage.tmp-99999999", None)  # no owner file: the name's pid
    trash = tmp_with(".stage.old-99999998", None)
    assert sorted(remove_stale(out)) == sorted([reused, rebooted, dead_old_style, trash])
    assert live.exists() and other_host.exists()


def test_failure_while_entering_removes_the_tmp_and_the_dirs_it_made(tiny_dir, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.shutil, "copy2", full)
    with pytest.raises(DiskError, match=r"^disk full while writing .*new/deeper/stage: free space or choose another"):
        with StageWriter(work / "new" / "deeper" / "stage", "calibrate", {}, open_stage(tiny_dir)):
            pass
    assert list(work.iterdir()) == []


def test_ctrl_c_removes_the_tmp(tiny_dir, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(KeyboardInterrupt):
        with StageWriter(work / "stage", "calibrate", {}, open_stage(tiny_dir)) as writer:
            writer.save_tensors("calibrate", {"x": torch.ones(3)})
            raise KeyboardInterrupt
    assert list(work.iterdir()) == []


def test_disk_full_while_copying_the_parent(tiny_dir, tmp_path):
    with tmpfs(tmp_path / "small-fs", "size=1m") as fs:  # the tokenizer alone is larger
        with pytest.raises(QtoolError, match=r"^disk full while writing .*stage: free space or choose another --out$"):
            with StageWriter(fs / "stage", "calibrate", {}, open_stage(tiny_dir)):
                pass
        assert list(fs.iterdir()) == []


def test_disk_full_while_saving_tensors_and_journal_blocks(tmp_path):
    parent = _small_parent(tmp_path)
    with tmpfs(tmp_path / "small-fs", "size=1m") as fs:
        with pytest.raises(QtoolError, match=r"^disk full while writing .*stage: free space or choose another --out$"):
            with StageWriter(fs / "stage", "calibrate", {}, parent) as writer:
                writer.save_tensors("calibrate", {"x": torch.zeros(1 << 19)})  # 2 MiB
        assert list(fs.iterdir()) == []
        journal = BlockJournal(fs / "stage", "aaa")
        journal.save(0, {"t": torch.ones(2)})
        with pytest.raises(DiskError, match=r"^disk full while writing .*stage: free space"):
            journal.save(1, {"t": torch.zeros(1 << 19)})
        # the journal stays (a rerun after freeing space resumes), without the cut-off block
        assert sorted(p.name for p in journal.dir.iterdir()) == ["block-0000.safetensors", "journal.json"]


def test_read_only_output(tmp_path):
    parent = _small_parent(tmp_path)
    with tmpfs(tmp_path / "ro", "size=1m,ro") as fs:
        with pytest.raises(
            QtoolError, match=rf"^cannot write to {fs} \(read-only file system\): choose another --out$"
        ):
            check_output(str(fs / "stage"), parent, force=False)
        with pytest.raises(DiskError, match=r"^cannot write to .*\(read-only file system\): choose another --out$"):
            with StageWriter(fs / "stage", "calibrate", {}, parent):
                pass
        assert list(fs.iterdir()) == []


def test_permission_denied_output(tmp_path, monkeypatch):
    parent = _small_parent(tmp_path)
    work = tmp_path / "work"
    work.mkdir()

    def denied(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(checkpoint.os, "open", denied)  # root may write anywhere: simulate a chmod 555
    with pytest.raises(QtoolError, match=rf"^cannot write to {work} \(permission denied\): choose another --out$"):
        check_output(str(work / "a" / "stage"), parent, force=False)
    assert list(work.iterdir()) == []


@pytest.mark.parametrize(
    "make, out, message",
    [
        (None, "", r"^--out is empty: give the directory to write the stage to$"),
        (None, "   ", r"^--out is empty"),
        ("file", "target", r"^.*target is a file, not a directory; choose another --out$"),
        ("foreign", "target", r"^.*target exists and is not a qtool stage; choose another --out or remove it$"),
        ("input", "small", r"^output .*small is the input directory; choose another --out$"),
        (
            "stage",
            "target",
            r"^.*target already holds a 'calibrate' stage for other inputs; choose another --out or pass --force",
        ),
        ("corrupt", "target", r"^.*target already holds a qtool stage that is corrupt or from an incompatible qtool"),
        ("file", "target/stage", r"^.*target is a file, not a directory; choose another --out$"),
    ],
)
def test_check_output_refuses_bad_paths_and_changes_nothing(tmp_path, make, out, message):
    parent = _small_parent(tmp_path)
    target = tmp_path / "target"
    if make == "file":
        target.write_text("x")
    elif make == "foreign":
        target.mkdir()
        (target / "notes.txt").write_text("mine")
    elif make in ("stage", "corrupt"):
        with StageWriter(target, "calibrate", {"seed": 0}, parent) as writer:
            writer.commit()
        if make == "corrupt":
            (target / "qtool.json").write_text("{not json")
    before = _tree(tmp_path)
    with pytest.raises(QtoolError, match=message):
        check_output(str(tmp_path / out) if out.strip() else out, parent, force=False, fingerprint="other")
    assert _tree(tmp_path) == before


def test_check_output_accepts_new_empty_same_or_forced_outputs(tmp_path):
    parent = _small_parent(tmp_path)
    check_output(str(tmp_path / "new" / "deep" / "stage"), parent, force=False)
    assert not (tmp_path / "new").exists()  # checking creates nothing
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", parent, force=False)
    with StageWriter(tmp_path / "s", "calibrate", {"seed": 0}, parent) as writer:
        writer.commit()
    check_output(tmp_path / "s", parent, force=False, fingerprint=writer.fingerprint)  # complete: skipped later
    check_output(tmp_path / "s", parent, force=True, fingerprint="other")
    stale = tmp_path / ".s.tmp-99999999"
    stale.mkdir()
    check_output(tmp_path / "s", parent, force=True)
    assert not stale.exists()  # a dead run's tmp is gone before any work
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "s", "small"]


def test_empty_existing_directory_can_be_written(tmp_path):
    parent = _small_parent(tmp_path)
    (tmp_path / "empty").mkdir()
    with StageWriter(tmp_path / "empty", "calibrate", {}, parent) as writer:
        writer.commit()
    assert open_stage(tmp_path / "empty").name == "calibrate"


def test_journal_of_a_live_other_run_is_refused_and_of_a_dead_one_resumed(tmp_path):
    out = tmp_path / "stage"
    journal = BlockJournal(out, "aaa")
    journal.save(0, {"t": torch.ones(2)})
    meta = journal.dir / "journal.json"
    saved = json.loads(meta.read_text())
    parent_pid = os.getppid()
    live = {**saved["owner"], "pid": parent_pid, "start": checkpoint._start_time(parent_pid)}
    meta.write_text(json.dumps({**saved, "owner": live}))
    with pytest.raises(QtoolError, match=rf"is being written by another qtool run \(pid {parent_pid} on "):
        BlockJournal(out, "aaa")
    meta.write_text(json.dumps({**saved, "owner": {**saved["owner"], "pid": 99999999}}))
    assert torch.equal(BlockJournal(out, "aaa").load(0)["t"], torch.ones(2))  # resumed
    meta.write_text(json.dumps({**saved, "owner": {**saved["owner"], "pid": 99999999}}))
    assert BlockJournal(out, "bbb").load(0) is None  # replaced
    assert json.loads(meta.read_text())["owner"]["pid"] == os.getpid()


def test_journal_is_kept_only_where_a_rerun_uses_it():
    assert keeps_journal(KeyboardInterrupt())  # Ctrl-C
    assert keeps_journal(RuntimeError("CUDA out of memory"))  # a crash
    assert keeps_journal(DiskError("disk full while writing x: free space or choose another --out"))
    assert not keeps_journal(QtoolError("train-blockap diverged at block 3"))  # deterministic refusal


def test_model_fingerprint_is_of_content_not_path_or_times(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("QTOOL_CACHE", str(tmp_path / "cache"))
    first = model_fingerprint(tiny_dir)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dir, copy)  # new path, new inode, new times
    assert model_fingerprint(copy) == first
    os.utime(copy / "model.safetensors", ns=(1, 1))
    assert model_fingerprint(copy) == first
    assert list((tmp_path / "cache" / "hashes").iterdir())  # file hashes are cached
    weights = bytearray((copy / "model.safetensors").read_bytes())
    weights[-1] ^= 0xFF  # the same header (shapes, dtypes), another value
    (copy / "model.safetensors").write_bytes(bytes(weights))
    assert model_fingerprint(copy) != first
    (copy / "model.safetensors").write_bytes((tiny_dir / "model.safetensors").read_bytes())
    assert model_fingerprint(copy) == first
    assert model_fingerprint(tiny_dir) == first


def test_model_fingerprint_cache_is_checked_against_size_and_time(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("QTOOL_CACHE", str(tmp_path / "cache"))
    checkpoint._HASHES.clear()
    first = model_fingerprint(tiny_dir)
    for entry in (tmp_path / "cache" / "hashes").iterdir():
        entry.write_text("garbage")  # a damaged entry is recomputed
    checkpoint._HASHES.clear()
    assert model_fingerprint(tiny_dir) == first


# -- end to end through the Stage base (issue 23's cases through the CLI: tests/test_hostile_inputs.py) --


def test_e2e_other_inputs_refused_unless_force_and_same_inputs_skipped(tiny_dir, tmp_path):
    from qtool.stages.calibrate import CalibrateParams, calibrate

    out = tmp_path / "work" / "cal"
    params = CalibrateParams(str(tiny_dir), str(out), samples=2, seqlen=16)
    calibrate(params, device="cpu")
    assert calibrate(params, device="cpu").skipped
    before = _tree(tmp_path)
    with pytest.raises(QtoolError, match=r"cal already holds a 'calibrate' stage for other inputs; .* --force"):
        calibrate(params, device="cpu", seed=1)
    assert _tree(tmp_path) == before
    assert not calibrate(params, device="cpu", seed=1, force=True).skipped
    assert open_stage(out).manifest["params"]["seed"] == 1


def test_e2e_the_input_directory_as_output_fails_before_any_work(tiny_dir, tmp_path):
    from qtool.stages.calibrate import CalibrateParams, calibrate

    before = _tree(tmp_path)
    with pytest.raises(QtoolError, match="is the input directory"):
        calibrate(CalibrateParams(str(tiny_dir), str(tiny_dir), samples=2, seqlen=16), device="cpu")
    assert _tree(tmp_path) == before


def test_e2e_refusal_mid_run_drops_the_journal_a_crash_keeps_it(tiny_dir, tmp_path, monkeypatch):
    import qtool.stages.calibrate as cal

    out = tmp_path / "cal"
    params = cal.CalibrateParams(str(tiny_dir), str(out), samples=2, seqlen=16)
    real = cal.block_stats

    def fails_at_block_2(error):
        def stats(block, adapter, index, *args):
            if index == 2:
                raise error
            return real(block, adapter, index, *args)

        return stats

    monkeypatch.setattr(cal, "block_stats", fails_at_block_2(QtoolError("diverged at block 2")))
    with pytest.raises(QtoolError, match="diverged"):
        cal.calibrate(params, device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-llama"]  # no tmp, no partial
    monkeypatch.setattr(cal, "block_stats", fails_at_block_2(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        cal.calibrate(params, device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cal.partial", "tiny-llama"]  # resumable
