"""CPU: kernels.chooser, the one kernel choice: its default rule, its measured table (a file in
$QTOOL_CACHE), and that pack (choose_layout), kernels.ops and PackedLinear take their decisions from it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qtool import kernels
from qtool.bench.kernel_bench import parse_path, tune_paths
from qtool.core.errors import QtoolError
from qtool.core.paths import cache_dir
from qtool.core.quantizer import quantize_weight
from qtool.core.spec import parse_spec
from qtool.kernels import chooser, ops
from qtool.runtime.packed_linear import PackedLinear

N, K = 64, 256  # the layer every table below describes


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty QTOOL_CACHE: no table unless a test writes one; the chooser forgets earlier tables."""
    monkeypatch.setenv("QTOOL_CACHE", str(tmp_path))
    chooser.reload()
    yield tmp_path
    chooser.reload()


def _table(cache, entries, device="NVIDIA H100 80GB HBM3", version=2):
    (cache / "kernel_table.json").write_text(json.dumps({"version": version, "device": device, "entries": entries}))
    chooser.reload()


def _entry(layout, wbits, abits, group, m, path, us, n=N, k=K):
    return dict(layout=layout, wbits=wbits, abits=abits, group=group, m=m, n=n, k=k, path=path, us=us)


def _w_only_rule(m, bits, wgmma=True):
    """The weight-only default, written out: SIMT (W2/W3 to 16 rows, W4/W8 at 1), the mma GEMV to 16,
    then the wgmma GEMM (where it runs) to 128, dequantize + cuBLAS above."""
    if wgmma and 17 <= m <= 128:
        return "wgmma"
    if m > 16:
        return "dequant"
    return "simt" if m <= {2: 16, 3: 16, 4: 1, 8: 1}[bits] else "mma"


def _layer(spec_name, layout, k=K):
    spec = parse_spec(spec_name)
    w = torch.randn(N, k, generator=torch.Generator().manual_seed(0))
    return PackedLinear.from_codes(*quantize_weight(w, spec), spec, layout)


# -- the default rule ------------------------------------------------------------------------------
def test_default_weight_only_path(cache):
    for bits in (2, 3, 4, 8):
        for abits in (16, 8, 4, 2):
            for m in range(0, 300):
                assert chooser.default_path("wonly", bits, abits, m) == _w_only_rule(m, bits), (bits, abits, m)
                off_sm90 = chooser.default_path("wonly", bits, abits, m, wgmma=False)
                assert off_sm90 == _w_only_rule(m, bits, wgmma=False), (bits, abits, m)


def test_default_rule_named_cases(cache):
    # W2A8 / W4A4 / W2A2 at M = 1: the weight-only layout and its SIMT GEMV (measured 2.5-4.7x fp16
    # against the u8 IMMA path's 1.2x), as pack's auto layout writes them
    for spec in ("W2A8", "W4A4", "W2A2"):
        s = parse_spec(spec)
        assert chooser.choose_layout(s) == "wonly"
        assert chooser.choose_path("wonly", s.w_bits, s.a_bits, s.group, 1, 4096, 11008) == "simt"
    assert chooser.choose_path("wonly", 4, 16, 128, 1, 4096, 4096) == "simt"
    assert chooser.choose_path("wonly", 4, 16, 128, 4, 4096, 4096) == "mma"  # W4 SIMT loses from M = 4 on
    assert chooser.choose_path("wonly", 2, 16, 64, 16, 4096, 4096) == "simt"  # W2/W3 keep SIMT up to 16
    assert chooser.choose_path("wonly", 4, 16, 128, 16, 4096, 4096) == "mma"
    assert chooser.choose_path("wonly", 3, 16, 128, 17, 4096, 4096) == "wgmma"  # batched decode
    assert chooser.choose_path("wonly", 3, 16, 128, 128, 4096, 4096) == "wgmma"
    assert chooser.choose_path("wonly", 3, 16, 128, 129, 4096, 4096) == "dequant"  # prefill
    assert chooser.choose_path("u8", 4, 4, 128, 16, 4096, 4096) == "u8_gemm"
    assert chooser.choose_path("u8", 4, 4, 128, 17, 4096, 4096) == "u8_gemm_tiled"
    assert chooser.choose_path("planes", 1, 4, 128, 16, 4096, 4096) == "bitplane_gemv"
    assert chooser.choose_path("planes", 6, 8, 128, 64, 4096, 4096) == "bitplane_gemm"
    assert chooser.auto_layout(6, 8) == "planes" and chooser.auto_layout(1, 4) == "planes"
    assert chooser.auto_layout(5, 16) is None


def test_default_rule_refuses_what_no_kernel_runs(cache):
    for layout, wbits, abits in [("wonly", 5, 16), ("wonly", 4, 12), ("u8", 5, 8), ("u8", 4, 16), ("planes", 9, 8)]:
        with pytest.raises(QtoolError, match=f"the {layout} kernels take"):
            chooser.default_path(layout, wbits, abits, 1)
    with pytest.raises(QtoolError, match="unknown layout 'nibbles'"):
        chooser.choose_path("nibbles", 4, 4, 128, 1, N, K)


# -- the layout (pack) -------------------------------------------------------------------------------
def test_choose_layout_lives_in_the_chooser_and_keeps_its_messages():
    assert kernels.choose_layout is chooser.choose_layout
    assert [chooser.choose_layout(parse_spec(s)) for s in ("W4A16-g128", "W3A8-g32", "W6A8", "W2*A16-g32")] == [
        "wonly",
        "wonly",
        "planes",
        "wonly",
    ]
    for spec, layout, message in [
        ("W5A16", "auto", "W5A16: weight-only kernels exist for (2, 3, 4, 8) bits, not 5; quantize to one of those"),
        (
            "W4A16",
            "u8",
            "W4A16 keeps activations in 16 bits: the u8 layout needs an activation spec (e.g. W4A8); "
            "use --layout wonly",
        ),
        (
            "W4A8-tensor",
            "auto",
            "W4A8-tensor: no kernel takes per-tensor activation ranges; "
            "pack per-token (drop -tensor) or -cluster-dynamic",
        ),
        ("W6A8", "u8", "W6A8: the u8 layout holds weights of at most 4 bits; use --layout planes"),
    ]:
        with pytest.raises(QtoolError) as e:
            chooser.choose_layout(parse_spec(spec), layout)
        assert str(e.value) == message


def test_pack_takes_its_layout_from_the_chooser(monkeypatch):
    from conftest import tiny_model
    from qtool.models.adapters import adapter_for
    from qtool.runtime.packed_model import pack_model

    monkeypatch.setattr(chooser, "auto_layout", lambda wbits, abits: "u8")  # a rule that says u8 for W4A8
    model = tiny_model("llama")
    assert pack_model(model, adapter_for(model.config), parse_spec("W4A8")) == "u8"
    assert {m.layout for m in model.modules() if isinstance(m, PackedLinear)} == {"u8"}


# -- the measured table --------------------------------------------------------------------------------
def test_table_path_is_the_core_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("QTOOL_CACHE", str(tmp_path / "c"))
    assert chooser.table_path() == cache_dir() / "kernel_table.json" == tmp_path / "c" / "kernel_table.json"
    monkeypatch.delenv("QTOOL_CACHE")
    assert chooser.table_path() == Path.home() / ".cache" / "qtool" / "kernel_table.json"


def test_table_decides_at_the_nearest_measured_shape(cache):
    _table(
        cache,
        [
            _entry("wonly", 4, 16, 128, 1, "simt", 20.0),
            _entry("wonly", 4, 16, 128, 1, "dequant", 10.0),  # fastest at M = 1
            _entry("wonly", 4, 16, 128, 64, "dequant", 90.0),
            _entry("wonly", 4, 16, 128, 64, "mma", 50.0),  # fastest at M = 64 (ops rules it out above 16)
            _entry("u8", 4, 4, 128, 1, "u8_gemm_tiled", 5.0),
            _entry("u8", 4, 4, 128, 1, "u8_gemm", 6.0),
        ],
    )
    assert chooser.choose_path("wonly", 4, 16, 128, 2, N, K) == "dequant"  # nearest measured M: 1
    assert chooser.choose_path("wonly", 4, 16, 128, 8, N, K) == "dequant"  # M = 1 and 64 equally near: the smaller
    assert chooser.choose_path("wonly", 4, 16, 128, 100, 2 * N, K) == "mma"
    assert chooser.choose_path("u8", 4, 4, 128, 1, N, K) == "u8_gemm_tiled"
    # no entries for these bits, group or layout: the default rule
    assert chooser.choose_path("wonly", 2, 16, 128, 1, N, K) == "simt"
    assert chooser.choose_path("wonly", 4, 16, 64, 1, N, K) == "simt"
    assert chooser.choose_path("wonly", 4, 8, 128, 1, N, K) == "simt"
    assert chooser.choose_path("planes", 4, 4, 128, 1, N, K) == "bitplane_gemv"
    # measured on another GPU: the default rule; on this one or an unnamed one: the table
    assert chooser.choose_path("wonly", 4, 16, 128, 1, N, K, device="NVIDIA A100-SXM4-80GB") == "simt"
    assert chooser.choose_path("wonly", 4, 16, 128, 1, N, K, device="NVIDIA H100 80GB HBM3") == "dequant"


def test_per_channel_groups_match_whatever_their_spelling(cache):
    _table(cache, [_entry("wonly", 2, 8, 0, 1, "mma", 1.0)])
    for group in (None, 0, K, 2 * K):
        assert chooser.choose_path("wonly", 2, 8, group, 1, N, K) == "mma"
    assert chooser.choose_path("wonly", 2, 8, 128, 1, N, K) == "simt"


def test_write_table_round_trips_and_replaces_the_decisions(cache):
    assert chooser.choose_path("wonly", 8, 16, 128, 1, N, K) == "simt"
    p = chooser.write_table([_entry("wonly", 8, 16, 128, 1, "mma", 3.5)], "GPU X")
    assert p == cache / "kernel_table.json"
    assert chooser.load_table() == {
        "version": 2,
        "device": "GPU X",
        "entries": [_entry("wonly", 8, 16, 128, 1, "mma", 3.5)],
    }
    assert chooser.choose_path("wonly", 8, 16, 128, 1, N, K) == "mma"
    with pytest.raises(QtoolError, match="entry 0"):
        chooser.write_table([_entry("wonly", 8, 16, 128, 1, "u8_gemm", 3.5)], "GPU X")  # not a weight-only kernel


@pytest.mark.parametrize(
    "text,why",
    [
        ("{oops", "is not valid JSON"),
        (json.dumps({"device": "H100", "entries": []}), "has format None, this qtool reads version 2"),
        (json.dumps([1, 2]), "has format 'list'"),
        (json.dumps({"version": 2, "device": "H100", "entries": {}}), "needs 'device'"),
        (json.dumps({"version": 2, "device": None, "entries": [{"layout": "wonly", "path": "simt"}]}), "entry 0"),
        (
            json.dumps({"version": 2, "device": None, "entries": [_entry("wonly", 4, 16, 128, 1, "fast", 1.0)]}),
            "entry 0",
        ),
    ],
)
def test_a_bad_table_is_a_one_line_error(cache, text, why):
    (cache / "kernel_table.json").write_text(text)
    w = kernels.pack_wonly(torch.zeros(N, K, dtype=torch.int64), 4, torch.ones(N, 2), torch.zeros(N, 2), 128)
    for call in (lambda: chooser.load_table(), lambda: ops.w_only_impl(1, w)):
        with pytest.raises(QtoolError) as e:
            call()
        message = str(e.value)
        assert why in message and str(cache / "kernel_table.json") in message
        assert "\n" not in message and message.endswith("delete it or rerun `qtool bench kernels --tune`")


# -- the callers ---------------------------------------------------------------------------------------
def test_ops_w_only_impl_follows_the_table(cache, monkeypatch):
    w = kernels.pack_wonly(torch.zeros(N, K, dtype=torch.int64), 4, torch.ones(N, 2), torch.zeros(N, 2), 128)
    # the default rule; the wgmma GEMM it names at M = 17 runs on sm_90 only (here: the CPU)
    assert ops.w_only_impl(3, w) == "mma" and ops.w_only_impl(17, w) == "dequant"
    w2 = kernels.pack_wonly(torch.zeros(N, K, dtype=torch.int64), 2, torch.ones(N, 4), torch.zeros(N, 4), 64)
    with monkeypatch.context() as patch:
        patch.setattr(ops, "_simt_fits", lambda w, m, gated=False, norm=False: True)  # asks the GPU
        assert ops.w_only_impl(16, w2) == "simt" and ops.w_only_impl(17, w2) == "dequant"  # off sm_90
        patch.setattr(ops, "wgmma_runs", lambda device: True)
        assert ops.w_only_impl(17, w) == "wgmma" and ops.w_only_impl(129, w) == "dequant"
        assert ops.w_only_impl(16, w2) == "simt" and ops.w_only_impl(17, w2) == "wgmma"
    _table(
        cache,
        [
            _entry("wonly", 4, 16, 128, 1, "dequant", 1.0),
            _entry("wonly", 4, 16, 128, 16, "simt", 1.0),
            _entry("wonly", 4, 16, 128, 256, "mma", 1.0),
            _entry("wonly", 4, 8, 128, 1, "mma", 1.0),
        ],
    )
    assert ops.w_only_impl(1, w) == "dequant"
    assert ops.w_only_impl(1, w, a_bits=8) == "mma"  # quantizing x in the GEMV: the A8 entries
    assert ops.w_only_impl(256, w) == "dequant"  # the table's mma, overruled: the mma GEMV takes <= 16 rows
    monkeypatch.setattr(ops, "_simt_fits", lambda w, m, gated=False, norm=False: not norm)
    assert ops.w_only_impl(16, w) == "simt"
    assert ops.w_only_impl(16, w, norm=True) == "mma"  # no shared memory left for the norm's weight


def test_ops_lowbit_impl_follows_the_table(cache):
    u8 = _layer("W4A4", "u8")
    planes = _layer("W4A4-g64", "planes")
    assert (
        ops.lowbit_impl(1, u8._lowbit(), 4) == "u8_gemm" and ops.lowbit_impl(17, planes._lowbit(), 4) == "bitplane_gemm"
    )
    _table(
        cache, [_entry("u8", 4, 4, 0, 1, "u8_gemm_tiled", 1.0), _entry("planes", 4, 4, 64, 64, "bitplane_gemv", 1.0)]
    )
    assert ops.lowbit_impl(1, u8._lowbit(), 4) == "u8_gemm_tiled"
    assert ops.lowbit_impl(16, planes._lowbit(), 4) == "bitplane_gemv"
    assert ops.lowbit_impl(64, planes._lowbit(), 4) == "bitplane_gemm"  # the bit-plane GEMV takes <= 16 rows
    assert ops._segments_group(planes.segments) == 64 and ops._segments_group(u8.segments) == K


def test_packed_linear_forward_runs_the_chooser_kernel(cache, monkeypatch):
    monkeypatch.setattr(ops, "_simt_fits", lambda w, m, gated=False, norm=False: True)  # no GPU to ask here
    layer = _layer("W4A16-g128", "wonly")
    assert layer.kernel_path(1) == "simt" and layer.kernel_path(2) == "mma"
    _table(cache, [_entry("wonly", 4, 16, 128, 1, "dequant", 1.0)])
    assert layer.kernel_path(1) == "dequant"
    seen = {}

    def fake_gemm(x, w, bias=None, out=None, impl=None, **ops_args):
        seen["impl"] = impl
        return torch.zeros(x.shape[0], w.n, dtype=x.dtype)

    monkeypatch.setattr(kernels, "w_only_gemm", fake_gemm)
    layer._forward_kernel(torch.randn(1, K, dtype=torch.float16))  # what forward calls on a GPU
    assert seen["impl"] == "dequant"


# -- the benchmark ---------------------------------------------------------------------------------------
def test_bench_paths_ask_the_chooser():
    assert parse_path("w2a8") == (2, 8, "wonly", None)  # pack's auto layout, the chooser's kernel per M
    assert parse_path("w5a8") == (5, 8, "planes", None)
    assert parse_path("w2a2:bitplane") == (2, 2, "planes", None)
    assert parse_path("w4a4:u8_gemm_tiled") == (4, 4, "u8", "u8_gemm_tiled")
    assert parse_path("w4a16:dequant") == (4, 16, "wonly", "dequant")
    assert tune_paths(["fp16", "w8a16", "w4a16:mma"]) == ["w8a16:simt", "w8a16:mma", "w8a16:wgmma", "w8a16:dequant"]
    for bad in ("w4a4:nibbles", "w4a12", "x4a16"):
        with pytest.raises(QtoolError, match="bad path"):
            parse_path(bad)


def test_bench_implementation_does_not_import_its_cli():
    code = "import sys, qtool.bench.kernel_bench, qtool.bench.e2e; assert 'qtool.bench.cli' not in sys.modules"
    src = Path(__file__).resolve().parents[2] / "src"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(src)})
