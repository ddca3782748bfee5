"""The one place that decides which kernel runs a packed linear.

Two decisions, both asked here by every caller (pack, PackedLinear, kernels.ops, the benchmarks):

- the layout (`choose_layout`, pack time): how `qtool pack` stores a spec's weights. It follows from
  the spec alone (`auto_layout`), never from a measured table: a checkpoint must not depend on the
  machine that packed it.
- the path (`choose_path`, run time): which kernel of that layout multiplies M rows of x by the
  [N, K] weights (PATHS): weight-only 'simt' (SIMT GEMV), 'mma' (tensor-core GEMV), 'wgmma' (Hopper
  GEMM, sm_90a) or 'dequant' (dequantize once, then cuBLAS); u8 'u8_gemm' (split-K IMMA) or
  'u8_gemm_tiled' (shared-memory tiles); bit-planes 'bitplane_gemv' (CUDA cores) or 'bitplane_gemm'
  (AND+POPC tensor cores).
  A table measured by `qtool bench kernels --tune` decides where it has entries for the layout, bit
  widths and group (the fastest path at the nearest measured (M, N, K)); otherwise `default_path`.

kernels.ops asks `choose_path` wherever a caller does not force a kernel (ops.w_only_impl,
ops.lowbit_impl) and overrides it only where the kernel cannot run the call: the SIMT GEMV without
room in shared memory for M rows of x (and the prologue's operands) falls back to the mma GEMV, the
wgmma GEMM off sm_90 falls back to the mma GEMV or dequant, and the GEMVs that take at most
ops.GEMV_ROWS rows (mma, bit-plane) fall back to dequant / bitplane_gemm.

The default rule, from the H100 measurements in benchmarks/results/:

- The layout is weight-only wherever it holds the weight width (2, 3, 4, 8 bits), also for specs that
  quantize activations (the GEMV quantizes x per token itself): at M = 1, W2A8 / W2A2 / W4A4 on the u8
  IMMA path ran at 1.18-1.26x fp16 (kernels_h100.csv: 29.7 us on 4096x11008, 40.8 us on 8192x8192,
  128.6 us on 28672x8192), the SIMT GEMV at 3.02-4.72x fp16 for W2-g64 and 2.52-3.58x for W4-g128
  (gemv_variants_h100.csv: 12.0, 13.9, 34.2 us; 14.4, 17.2, 45.2 us), and 2.7x with its in-kernel
  W2A8 quantization (fused_gemv_h100.jsonl: down_proj 4096x11008 13.3 us against fp16's 36.2 us).
  At M = 4 the W2/W4 weight-only GEMVs (1.75-2.86x fp16) still beat u8 (1.14-1.46x); at M = 16 u8 (0.85-1.03x)
  beat the W2 GEMVs (0.60-0.75x) but not W4's (1.37-1.75x); at M = 64 u8 won on 28672x8192 only
  (0.93x vs 0.52x); at M >= 256 dequant + cuBLAS (0.40-0.95x) beat u8 (0.22-0.31x) and bit-planes
  (<= 0.09x) everywhere. One layout serves every M, and decode (M <= 4) is where low bits pay.
  Other widths go to bit-planes where activations are quantized.
- Weight-only path: SIMT GEMV up to SIMT_MAX_M rows, the mma GEMV up to GEMV_MAX_M, dequant above;
  on sm_90 the wgmma GEMM from GEMV_MAX_M + 1 to WGMMA_MAX_M rows (elsewhere ops takes the rule
  without it). Below 17 rows it would also beat SIMT for W2/W3 from M = 8 (benchmarks/results/
  wgmma_small_m_h100.csv, W2-g64 SIMT vs wgmma at M = 4 / 8 / 16: 25.0 / 35.7 / 57.4 vs 27.2 / 27.6 /
  28.7 us on 4096x11008, 26.1 / 40.8 / 70.5 vs 37.3 / 37.9 / 39.4 on 8192x8192; W3-g128 at 8 / 16:
  46.5 / 80.0 vs 29.7 / 30.6 and 57.4 / 102.5 vs 45.1 / 47.0), but its 16-row tile has not yet passed
  its GPU tests, so the rule keeps SIMT there; W4's mma GEMV beat it up to M = 16. H100, one run
  beside fp16 (benchmarks/gpu_wgmma.sh), W4-g128 / W2-g64 wgmma vs dequant in us: 4096x11008 M=32
  31.1 / 28.6 vs 80.0 (fp16 36.4), M=64 43.4 / 38.1 vs 81.7 (fp16 38.0), M=128 62.4 / 59.5 vs 82.9,
  M=256 113.3 / 109.6 vs 92.5; 8192x8192 M=32 48.3 / 44.8 vs 112.9 (fp16 47.9), M=64 69.2 / 61.1 vs
  112.9, M=128 92.9 / 88.1 vs 114.3, M=256 169.8 / 159.5 vs 118.1.
- u8 and bit-planes: the GEMV-shaped kernel (u8_gemm, bitplane_gemv) up to GEMV_MAX_M rows, the
  tiled GEMM above (not re-measured against each other: `--tune` times both).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from qtool.core.errors import QtoolError
from qtool.core.paths import cache_dir
from qtool.core.spec import QuantSpec
from qtool.kernels.layouts import WONLY_BITS

LAYOUTS = ("wonly", "u8", "planes")
PATHS = {
    "wonly": ("simt", "mma", "wgmma", "dequant"),
    "u8": ("u8_gemm", "u8_gemm_tiled"),
    "planes": ("bitplane_gemv", "bitplane_gemm"),
}
LAYOUT_OF = {path: layout for layout, paths in PATHS.items() for path in paths}

GEMV_MAX_M = 16  # above this the default rule leaves the GEMVs for the GEMMs (weight-only: dequantize + cuBLAS)
# Largest M for the SIMT GEMV (x rows in slices of <= 4 per block); the mma GEMV takes M up to
# GEMV_MAX_M above it. Set from an H100 run of benchmarks/gemv_variants.py (both forced at M = 1, 4, 16;
# benchmarks/results/gemv_variants_h100.csv, with the earlier 32-bit scale|zero words; the split fp16 scale
# and uint8 zero loads add ~6 instructions per group): SIMT costs ~(2 + M) instructions per weight
# pair (W4: ~84 per 16-byte word at M = 1, ~158 at M = 4), so for W4 it wins at M = 1 (2.5-3.6x fp16 vs 2.0-2.4x) but
# not at M = 4 (1.6x vs 1.9x on 4096x11008); W8 follows W4 (not measured). W2/W3 stay on SIMT up to
# M = 16: there the mma GEMV reads x fragments through L1 at 16 B per 8 codes per row (0.59-0.68x fp16
# at M = 16 against SIMT's 0.66-0.75x), and dequantize + cuBLAS writes the fp16 weights first (0.43x).
SIMT_MAX_M = {2: 16, 3: 16, 4: 1, 8: 1}
# Where the wgmma GEMM runs (sm_90), it takes GEMV_MAX_M < M <= WGMMA_MAX_M rows (module docstring).
WGMMA_MAX_M = 128

TABLE_NAME = "kernel_table.json"
TABLE_VERSION = 2
_ENTRY_INTS = ("wbits", "abits", "group", "m", "n", "k")
_TABLES: dict = {}  # table path -> loaded table (or None): read once per process, `reload` to re-read
_DECISIONS: dict = {}  # (QTOOL_CACHE, layout, bits, group, m, n, k, device) -> path
_MAX_DECISIONS = 1 << 14


# -- layout (pack time) ---------------------------------------------------------------------------
def auto_layout(wbits: int, abits: int) -> str | None:
    """The layout `--layout auto` packs wbits-bit weights into (abits 16: activations stay float):
    weight-only wherever it holds the width, else bit-planes where activations are quantized, else
    None (no kernel)."""
    if wbits in WONLY_BITS:
        return "wonly"
    return "planes" if abits < 16 else None


def holds(layout: str, wbits: int, abits: int) -> bool:
    """Whether `layout`'s kernels run wbits-bit weights against abits-bit activations (16: float)."""
    a_ok = abits == 16 or 1 <= abits <= 8
    if layout == "wonly":
        return wbits in WONLY_BITS and a_ok
    if layout in ("u8", "planes"):
        return 1 <= wbits <= (4 if layout == "u8" else 8) and 1 <= abits <= 8
    return False


def layouts_for(wbits: int, abits: int) -> tuple[str, ...]:
    """Every layout whose kernels run (wbits, abits)."""
    return tuple(layout for layout in LAYOUTS if holds(layout, wbits, abits))


def choose_layout(spec: QuantSpec, layout: str = "auto") -> str:
    """The kernel layout a spec packs into, or a one-line error when no kernel runs it.

    auto (`auto_layout`): the weight-only layout wherever it holds the weight width, also for specs
    that quantize activations (quantized on the fly, then multiplied in 16 bits against the packed
    weights): on the H100 it beat the integer GEMMs at every batch size we measured (benchmarks/results/,
    the module docstring), and it stores 2-bit weights in 2 bits. u8 (integer tensor cores, W <= 4)
    and planes (bit-plane binary GEMM) run activations as integers."""
    bits = spec.w_storage_bits
    if layout not in ("auto", *LAYOUTS):
        raise QtoolError(f"unknown layout {layout!r}: use auto, {', '.join(LAYOUTS)}")
    if not spec.quantizes_weights:
        raise QtoolError(f"{spec.name} leaves the weights in float: pack a quantized spec, e.g. --spec W4A16-g128")
    if spec.quantizes_activations and spec.a_granularity == "tensor":
        raise QtoolError(
            f"{spec.name}: no kernel takes per-tensor activation ranges; "
            "pack per-token (drop -tensor) or -cluster-dynamic"
        )
    if spec.uses_ranges and spec.a_static:
        raise QtoolError(
            f"{spec.name} uses static activation ranges, which no kernel supports: "
            f"pack the dynamic variant ({spec.name}-dynamic)"
        )
    if spec.quantizes_activations and spec.a_bits > 8:
        raise QtoolError(f"{spec.name}: packed kernels take activations of at most 8 bits")
    if layout == "auto":
        layout = auto_layout(bits, spec.a_bits if spec.quantizes_activations else 16)
        if layout is None:
            raise QtoolError(
                f"{spec.name}: weight-only kernels exist for {WONLY_BITS} bits, not {bits}; quantize to one of those"
            )
    if layout == "wonly" and bits not in WONLY_BITS:
        raise QtoolError(f"{spec.name}: the weight-only layout holds {WONLY_BITS} bits, not {bits}; use --layout auto")
    if layout in ("u8", "planes"):
        if not spec.quantizes_activations:
            raise QtoolError(
                f"{spec.name} keeps activations in 16 bits: the {layout} layout needs an activation spec "
                "(e.g. W4A8); use --layout wonly"
            )
        if layout == "u8" and bits > 4:
            raise QtoolError(f"{spec.name}: the u8 layout holds weights of at most 4 bits; use --layout planes")
    return layout


# -- path (run time) ------------------------------------------------------------------------------
def _check(layout: str, wbits: int, abits: int) -> None:
    if layout not in LAYOUTS:
        raise QtoolError(f"unknown layout {layout!r}: use {', '.join(LAYOUTS)}")
    if not holds(layout, wbits, abits):
        what = {
            "wonly": f"weights of {WONLY_BITS} bits and activations of 16 or 1..8 bits",
            "u8": "weights of 1..4 bits and activations of 1..8 bits",
            "planes": "weights and activations of 1..8 bits",
        }[layout]
        raise QtoolError(f"the {layout} kernels take {what}, got W{wbits}A{abits}: pack another layout or spec")


def default_path(layout: str, wbits: int, abits: int, m: int, wgmma: bool = True) -> str:
    """The kernel the default rule runs for M rows (see the module docstring for its measurements);
    wgmma=False: the rule where the wgmma GEMM cannot run (off sm_90)."""
    _check(layout, wbits, abits)
    if layout == "wonly":
        if wgmma and GEMV_MAX_M < m <= WGMMA_MAX_M:
            return "wgmma"
        if m > GEMV_MAX_M:
            return "dequant"
        return "simt" if m <= SIMT_MAX_M[wbits] else "mma"
    return PATHS[layout][0 if m <= GEMV_MAX_M else 1]


def group_key(group: int | None, k: int) -> int:
    """The weight group as the table keys it: 0 for per-channel (None, 0 or a group spanning K)."""
    return int(group) if group and group < k else 0


def choose_path(
    layout: str,
    wbits: int,
    abits: int,
    group: int | None,
    m: int,
    n: int,
    k: int,
    device: str | None = None,
) -> str:
    """The kernel (one of PATHS[layout]) for M rows of x against wbits-bit [N, K] weights in `group`s
    (None or >= K: per channel), x quantized to abits (16: float): the measured table's fastest at the
    nearest measured shape where it has entries for (layout, wbits, abits, group) and was measured on
    `device` (None: any), else default_path. Decisions are kept for the process (`reload`)."""
    key = (os.environ.get("QTOOL_CACHE"), layout, wbits, abits, group_key(group, k), m, n, k, device)
    path = _DECISIONS.get(key)
    if path is None:
        path = _decide(layout, wbits, abits, key[4], m, n, k, device)
        if len(_DECISIONS) >= _MAX_DECISIONS:
            _DECISIONS.clear()
        _DECISIONS[key] = path
    return path


def _decide(layout: str, wbits: int, abits: int, group: int, m: int, n: int, k: int, device: str | None) -> str:
    fallback = default_path(layout, wbits, abits, m)
    table = _table()
    if table is None or (device is not None and table.get("device") not in (None, device)):
        return fallback
    rows = [
        r
        for r in table["entries"]
        if (r["layout"], r["wbits"], r["abits"]) == (layout, wbits, abits) and group_key(r["group"], r["k"]) == group
    ]
    if not rows:
        return fallback

    def distance(point):
        return sum(abs(math.log2(max(a, 1)) - math.log2(max(b, 1))) for a, b in zip(point, (m, n, k)))

    nearest = min({(r["m"], r["n"], r["k"]) for r in rows}, key=lambda p: (distance(p), p))
    return min((r for r in rows if (r["m"], r["n"], r["k"]) == nearest), key=lambda r: r["us"])["path"]


# -- the measured table ---------------------------------------------------------------------------
def table_path() -> Path:
    """Where `qtool bench kernels --tune` writes the table: $QTOOL_CACHE (else ~/.cache/qtool)/kernel_table.json."""
    return cache_dir() / TABLE_NAME


def _table() -> dict | None:
    p = table_path()
    if p not in _TABLES:
        _TABLES[p] = load_table(p)
    return _TABLES[p]


def reload() -> None:
    """Forget the tables read and the decisions made, so the next choose_path reads the table again."""
    _TABLES.clear()
    _DECISIONS.clear()


def _bad(p: Path, why: str) -> QtoolError:
    return QtoolError(f"kernel table {p} {why}: delete it or rerun `qtool bench kernels --tune`")


def check_table(table, p: Path | str = "(in memory)") -> dict:
    """`table` itself when it is a kernel table of this version, else a one-line QtoolError."""
    if not isinstance(table, dict) or table.get("version") != TABLE_VERSION:
        found = table.get("version") if isinstance(table, dict) else type(table).__name__
        raise _bad(p, f"has format {found!r}, this qtool reads version {TABLE_VERSION}")
    entries = table.get("entries")
    if not isinstance(entries, list) or not isinstance(table.get("device"), (str, type(None))):
        raise _bad(p, "needs 'device' (a name or null) and an 'entries' list")
    for i, r in enumerate(entries):
        ok = (
            isinstance(r, dict)
            and all(type(r.get(f)) is int for f in _ENTRY_INTS)
            and isinstance(r.get("us"), (int, float))
            and r.get("layout") in PATHS
            and r.get("path") in PATHS[r["layout"]]
        )
        if not ok:
            raise _bad(p, f"entry {i} is not {{layout, wbits, abits, group, m, n, k, path, us}} with a known path")
    return table


def load_table(path: Path | None = None) -> dict | None:
    """The measured table at `path` (default table_path()), None when there is none."""
    p = path or table_path()
    if not p.exists():
        return None
    try:
        table = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _bad(p, f"is not valid JSON ({e})") from e
    return check_table(table, p)


def write_table(entries: list[dict], device: str | None, path: Path | None = None) -> Path:
    """Write a measured table (entries as check_table describes them) and forget the old one."""
    p = path or table_path()
    table = check_table({"version": TABLE_VERSION, "device": device, "entries": entries}, p)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(table, indent=1))
    reload()
    return p
