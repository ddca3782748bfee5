import json
import os

import pytest
import torch

from qtool.core.checkpoint import (
    BlockJournal,
    StageWriter,
    check_safetensors,
    is_complete,
    open_stage,
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
