import hashlib

import pytest
import torch

from qtool.core.data import calibration_windows, eval_windows, read_text
from qtool.core.errors import QtoolError


def test_wikitext_test_is_joined_as_the_literature_does():
    text = read_text("wikitext2-test")
    assert len(text) == 1_294_336
    assert (
        hashlib.sha256(text.encode()).hexdigest() == "696cca6b65a171b0a358a4be6732cdfdf2dd6164a32e20fd70e3c13fc4dfae83"
    )
    valid = read_text("wikitext2-valid")
    assert (
        hashlib.sha256(valid.encode()).hexdigest() == "b44fb967f92b525731216a507d1fbc44b97446b7ef0a2b4d1a893f81f1bbc29e"
    )


def test_eval_windows_drop_the_tail():
    ids = torch.arange(10)
    assert eval_windows(ids, 3).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert eval_windows(ids, 3, windows=2).shape == (2, 3)
    with pytest.raises(QtoolError, match="fewer than one window"):
        eval_windows(ids, 11)


def test_calibration_windows_are_reproducible_slices():
    ids = torch.arange(1000)
    a = calibration_windows(ids, 5, 16, seed=3)
    assert torch.equal(a, calibration_windows(ids, 5, 16, seed=3))
    assert not torch.equal(a, calibration_windows(ids, 5, 16, seed=4))
    for row in a:  # each window is a contiguous slice of the text
        assert torch.equal(row, torch.arange(row[0], row[0] + 16))


def test_txt_and_jsonl_sources(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("hello world")
    assert read_text(str(txt)) == "hello world"
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"text": "one"}\n\n{"text": "two", "x": 1}\n')
    assert read_text(str(jsonl)) == "one\n\ntwo"
    jsonl.write_text('{"body": "one"}\n')
    with pytest.raises(QtoolError, match="a.jsonl:1 has no string field 'text'"):
        read_text(str(jsonl))
    assert read_text(str(jsonl), text_field="body") == "one"
    jsonl.write_text("not json\n")
    with pytest.raises(QtoolError, match="not valid JSON"):
        read_text(str(jsonl))
    with pytest.raises(QtoolError, match="not found"):
        read_text(str(tmp_path / "missing.txt"))


def test_data_fingerprint_is_of_the_files_content(tmp_path):
    from qtool.core.data import BUNDLED, bundled_dir, content_params, data_fingerprint

    path = tmp_path / "calib.txt"
    path.write_text("some text")
    first = data_fingerprint(str(path))
    assert first == hashlib.sha256(b"some text").hexdigest()
    copy = tmp_path / "copy.txt"
    copy.write_bytes(path.read_bytes())
    assert data_fingerprint(str(copy)) == first  # content, not path
    path.write_text("other text")
    assert data_fingerprint(str(path)) != first  # same path, new content
    bundled = bundled_dir("data") / BUNDLED["wikitext2-valid"]
    assert data_fingerprint("wikitext2-valid") == hashlib.sha256(bundled.read_bytes()).hexdigest()
    with pytest.raises(QtoolError, match="data 'nope.txt' not found"):
        data_fingerprint("nope.txt")
    params = {"data": str(path), "seed": 0}
    assert content_params(params) == {**params, "data_sha": data_fingerprint(str(path))}
    assert content_params({"seed": 0}) == {"seed": 0}
    assert content_params({"data": "nope.txt"}) == {"data": "nope.txt"}  # the stage's read reports it
