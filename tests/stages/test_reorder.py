"""RPTQ reorder stage: exact folds on every family and on SmolLM2, the stage round trip, bad input
(the clustering maths: tests/quant/test_rptq.py; cluster quantization: tests/quant/test_fakequant.py)."""

import pytest
import torch

from conftest import FAMILIES, forward_stats, tiny_model
from qtool.core.checkpoint import open_stage
from qtool.core.errors import QtoolError
from qtool.models.adapters import adapter_for
from qtool.quant.rptq import cluster_bounds
from qtool.runtime.loader import load, open_source
from qtool.stages.calibrate import CalibrateParams, calibrate
from qtool.stages.eval import EvalParams, evaluate
from qtool.stages.reorder import ReorderParams, reorder, reorder_model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_reorder_preserves_logits_in_float64(family):
    model = tiny_model(family).double()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    before = _logits(model, ids)
    tensors, _ = reorder_model(model, adapter_for(model.config), forward_stats(model, ids), clusters=8, head_clusters=4)
    # the folds really moved channels: no site of block 0 but K on RoPE models is the identity
    moved = {
        s
        for s in ("attn_in", "q_k", "v_o", "mlp_in", "mlp_mid")
        if not torch.equal(tensors[f"layers.0.{s}.perm"], torch.arange(tensors[f"layers.0.{s}.perm"].numel()))
    }
    assert moved == ({"attn_in", "v_o", "mlp_in", "mlp_mid"} | ({"q_k"} if family == "opt" else set()))
    after = _logits(model, ids)
    assert ((after - before).norm() / before.norm()).item() < 1e-6


@pytest.fixture
def reorder_stage(tiny_dir, tmp_path):
    cal = tmp_path / "cal"
    calibrate(CalibrateParams(str(tiny_dir), str(cal), samples=2, seqlen=32), device="cpu")
    out = tmp_path / "ro"
    reorder(ReorderParams(str(cal), str(out), clusters=8, head_clusters=2))
    return cal, out


def test_reorder_stage_round_trip(reorder_stage):
    cal, out = reorder_stage
    stage = open_stage(out)
    assert stage.stages == ["calibrate", "reorder"] and stage.has_tensors("reorder")
    tensors = stage.tensors("reorder")
    perm = tensors["layers.0.mlp_in.perm"]
    assert torch.equal(perm[tensors["layers.0.mlp_in.inverse"]], torch.arange(perm.numel()))
    old, new = open_stage(cal).tensors("calibrate"), stage.tensors("calibrate")
    assert torch.equal(new["layers.0.mlp.up_proj.input.max"], old["layers.0.mlp.up_proj.input.max"][perm])
    ids = torch.randint(0, 256, (1, 20))
    (m0, _), (m1, _) = load(open_source(str(cal))), load(open_source(str(out)))  # gathers re-installed
    a, b = _logits(m0, ids), _logits(m1, ids)
    assert ((a - b).norm() / a.norm()).item() < 1e-5
    bounds = cluster_bounds(tensors, adapter_for(m1.config), m1.config)
    assert bounds["layers.2.self_attn.o_proj.input"][-1] == 64
    for spec in ("W4A4KV4-cluster", "W4A16KV4-cluster", "W4A8-cluster-dynamic"):
        result = evaluate(EvalParams(str(out), spec=spec, seqlen=32, windows=1), device="cpu")
        assert result.spec == spec and result.ppl > 1


def test_bad_inputs_are_one_line_errors(reorder_stage, tmp_path):
    cal, out = reorder_stage
    with pytest.raises(QtoolError, match="already reordered"):
        reorder(ReorderParams(str(out), str(tmp_path / "again")))
    with pytest.raises(QtoolError, match="more than the 64 channels"):
        reorder(ReorderParams(str(cal), str(tmp_path / "x"), clusters=65))
    with pytest.raises(QtoolError, match="head dimension 16"):
        reorder(ReorderParams(str(cal), str(tmp_path / "x"), head_clusters=17))
    model = tiny_model("llama")
    adapter = adapter_for(model.config)
    stats = forward_stats(model, torch.randint(0, 256, (1, 8)))
    fewer = {k: v for k, v in stats.items() if not k.startswith("layers.2.")}
    with pytest.raises(QtoolError, match="lack layers.2"):
        reorder_model(model, adapter, fewer, 4, 2)
    more = {**stats, "layers.3.mlp.up_proj.input.max": torch.zeros(64)}
    with pytest.raises(QtoolError, match="more than 3 blocks"):
        reorder_model(model, adapter, more, 4, 2)
    wide = {**stats, "layers.1.mlp.down_proj.input.max": torch.zeros(128)}
    with pytest.raises(QtoolError, match="has 128 channels but the model has 96"):
        reorder_model(model, adapter, wide, 4, 2)
    with pytest.raises(QtoolError, match="needs a 'calibrate' stage"):
        reorder(ReorderParams(open_stage(cal).manifest["parent"]["path"], str(tmp_path / "y")))


def test_reorder_preserves_smollm2_logits(smollm2_dir):
    """The real model in float32: the reordered model's logits match to float32 accuracy."""
    model, _ = load(open_source(str(smollm2_dir)))
    ids = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(3))
    before = _logits(model, ids)
    reorder_model(model, adapter_for(model.config), forward_stats(model, ids), clusters=8, head_clusters=2)
    after = _logits(model, ids)
    assert ((after - before).norm() / before.norm()).item() < 1e-5
