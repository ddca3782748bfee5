"""Calibration statistics against an independent whole-model forward, and resume after a crash."""

import pytest
import torch

import qtool.stages.calibrate as cal
from qtool.core.checkpoint import open_stage
from qtool.core.data import calibration_windows, read_text, token_ids
from qtool.models.adapters import adapter_for
from qtool.models.loading import load_model, load_tokenizer
from qtool.stages.calibrate import CalibrateParams, calibrate


def _reference_stats(model_dir, params):
    """min/max/absmax per channel from hooks on a plain whole-model forward."""
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    adapter = adapter_for(model.config)
    windows = calibration_windows(token_ids(tok, read_text(params.data)), params.samples, params.seqlen, params.seed)
    seen = {}
    for i, block in enumerate(adapter.layers(model)):
        for name, lin in adapter.linears(block).items():
            lin.register_forward_pre_hook(
                lambda m, a, k=f"layers.{i}.{name}.input": seen.setdefault(k, []).append(a[0])
            )
            if name in (adapter.q, adapter.k, adapter.v):
                lin.register_forward_hook(
                    lambda m, a, o, k=f"layers.{i}.{name}.output": seen.setdefault(k, []).append(o)
                )
    with torch.no_grad():
        model(windows)
    ref = {}
    for key, xs in seen.items():
        flat = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])
        ref[f"{key}.min"], ref[f"{key}.max"], ref[f"{key}.absmax"] = flat.amin(0), flat.amax(0), flat.abs().amax(0)
    return ref


def test_calibrate_stats_match_whole_model_forward(tiny_dir, tmp_path):
    params = CalibrateParams(str(tiny_dir), str(tmp_path / "cal"), samples=3, seqlen=32, seed=7)
    result = calibrate(params, device="cpu")
    assert result.blocks == 3 and result.tokens == 96
    stage = open_stage(tmp_path / "cal")
    assert stage.name == "calibrate" and stage.manifest["params"]["seed"] == 7
    stats = stage.tensors("calibrate")
    ref = _reference_stats(tiny_dir, params)
    assert set(stats) == set(ref)
    for key in ref:
        assert torch.allclose(stats[key], ref[key], atol=1e-5), key
    # same inputs and parameters: the stage is found complete and skipped
    assert calibrate(params, device="cpu").skipped


def test_calibrate_resumes_after_a_crash(tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "cal"
    params = CalibrateParams(str(tiny_dir), str(out), samples=2, seqlen=16)
    real = cal.block_stats
    calls = []

    def dies_at_block_2(block, adapter, index, *args):
        calls.append(index)
        if index == 2:
            raise RuntimeError("killed")
        return real(block, adapter, index, *args)

    monkeypatch.setattr(cal, "block_stats", dies_at_block_2)
    with pytest.raises(RuntimeError):
        calibrate(params, device="cpu")
    assert not out.exists()  # nothing half-written
    calls.clear()
    monkeypatch.setattr(cal, "block_stats", lambda *a: (calls.append(a[2]), real(*a))[1])
    calibrate(params, device="cpu")
    assert calls == [2]  # blocks 0 and 1 came from the journal
    resumed = open_stage(out).tensors("calibrate")
    fresh = CalibrateParams(str(tiny_dir), str(tmp_path / "fresh"), samples=2, seqlen=16)
    calibrate(fresh, device="cpu")
    uninterrupted = open_stage(tmp_path / "fresh").tensors("calibrate")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
