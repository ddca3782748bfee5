"""CPU: the chooser's default rule and its use of a tuned table."""

import json

import pytest

from qtool.core.errors import QtoolError
from qtool.kernels.chooser import choose, default_path, load_table


def test_defaults_without_table(tmp_path, monkeypatch):
    monkeypatch.setenv("QTOOL_CACHE", str(tmp_path))
    assert choose(4, 16, 1, 4096, 4096) == "wonly_gemv"
    assert choose(4, 16, 16, 4096, 4096) == "wonly_gemv"
    assert choose(4, 16, 17, 4096, 4096) == "wonly_dequant_mm"
    assert choose(2, 2, 4096, 8192, 8192) == "u8"  # measured: one IMMA pass beats 4 b1 passes
    assert choose(2, 8, 1, 4096, 4096) == "u8"
    assert choose(1, 4, 1, 4096, 4096) == "bitplane"  # 1-bit planes: 4x fewer bytes than nibbles
    assert choose(1, 4, 64, 4096, 4096) == "u8"
    assert choose(4, 4, 4096, 8192, 8192) == "u8"
    assert choose(8, 8, 1, 4096, 4096) == "bitplane"  # u8 path holds <= 4-bit weights


def test_table_overrides_default(tmp_path, monkeypatch):
    monkeypatch.setenv("QTOOL_CACHE", str(tmp_path))
    rows = [
        dict(wbits=4, abits=4, m=1, n=4096, k=4096, path="u8", us=20.0),
        dict(wbits=4, abits=4, m=1, n=4096, k=4096, path="bitplane", us=10.0),
        dict(wbits=4, abits=4, m=4096, n=4096, k=4096, path="bitplane", us=900.0),
        dict(wbits=4, abits=4, m=4096, n=4096, k=4096, path="u8", us=400.0),
    ]
    (tmp_path / "kernel_table.json").write_text(json.dumps({"device": "H100", "entries": rows}))
    assert choose(4, 4, 2, 4096, 4096) == "bitplane"
    assert choose(4, 4, 2048, 4096, 4096) == "u8"
    assert choose(2, 16, 1, 4096, 4096) == "wonly_gemv"  # bits not in the table: default


def test_bad_inputs(tmp_path, monkeypatch):
    monkeypatch.setenv("QTOOL_CACHE", str(tmp_path))
    with pytest.raises(QtoolError):
        default_path(5, 16, 1)
    with pytest.raises(QtoolError):
        default_path(4, 12, 1)
    (tmp_path / "kernel_table.json").write_text("{oops")
    with pytest.raises(QtoolError, match="not valid JSON"):
        load_table()
