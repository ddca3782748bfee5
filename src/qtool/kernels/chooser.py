"""Choosing the fastest kernel path for (wbits, abits, M, N, K) on this GPU.

A table measured by `qtool bench kernels --tune` (JSON in $QTOOL_CACHE or ~/.cache/qtool) wins when
it has the bit widths; otherwise a default rule: weight-only GEMV for A16 at small M (cuBLAS on
dequantized weights above), the u8 IMMA path when it can hold the weights (<= 4 bits; measured
faster than bit-planes for W2A2 and W2A8), bit-planes for W5-W8 and for W1 decode.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from qtool.core.errors import QtoolError

TABLE_NAME = "kernel_table.json"


def cache_dir() -> Path:
    return Path(os.environ.get("QTOOL_CACHE", Path.home() / ".cache" / "qtool"))


def table_path() -> Path:
    return cache_dir() / TABLE_NAME


def load_table(path: Path | None = None) -> dict | None:
    p = path or table_path()
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise QtoolError(
            f"kernel table {p} is not valid JSON ({e}): delete it or rerun `qtool bench kernels --tune`"
        ) from e


def default_path(wbits: int, abits: int, m: int) -> str:
    if not 1 <= wbits <= 8:
        raise QtoolError(f"weight bits must be in 1..8, got {wbits}")
    if abits >= 16:
        if wbits not in (2, 3, 4, 8):
            raise QtoolError(f"weight-only kernels support 2, 3, 4 or 8 bits, got {wbits}: repack to one of those")
        from qtool.kernels.ops import GEMV_MAX_M

        return "wonly_gemv" if m <= GEMV_MAX_M else "wonly_dequant_mm"
    if not 1 <= abits <= 8:
        raise QtoolError(f"activation bits must be in 1..8 or 16, got {abits}")
    # H100 round 2: u8 beat bit-planes for W2A8 and W2A2 at every M (nibbles move 2x the bytes of 2-bit
    # planes, but one IMMA pass beats p*q AND+POPC passes); 1-bit weights keep the planes' 4x byte saving
    if wbits > 4 or (wbits == 1 and m <= 16):
        return "bitplane"
    return "u8"


def choose(
    wbits: int, abits: int, m: int, n: int, k: int, device_name: str | None = None, table: dict | None = None
) -> str:
    """The path to run: the measured fastest at the nearest tuned shape, else default_path."""
    fallback = default_path(wbits, abits, m)
    table = table if table is not None else load_table()
    if not table:
        return fallback
    rows = [
        r
        for r in table.get("entries", [])
        if r["wbits"] == wbits
        and r["abits"] == abits
        and (device_name is None or table.get("device") in (None, device_name))
    ]
    if not rows:
        return fallback

    def distance(r):
        return abs(math.log2(max(r["m"], 1)) - math.log2(max(m, 1))) + abs(
            math.log2(r["n"] * r["k"]) - math.log2(n * k)
        )

    best = min(distance(r) for r in rows)
    nearest = [r for r in rows if distance(r) == best]
    return min(nearest, key=lambda r: r["us"])["path"]
