"""E2E-QP: only step sizes change, codes stay bit-identical, resume is exact, clear errors (the step
sizes' gradient: tests/quant/test_step_sizes.py)."""

import pytest
import torch

import qtool.stages.base as base
from qtool.core.checkpoint import BlockJournal, open_stage
from qtool.core.errors import QtoolError
from qtool.core.spec import parse_spec
from qtool.models.adapters import adapter_for
from qtool.models.loading import load_model
from qtool.quant.qparams import model_qparams, stage_qparams
from qtool.stages.tune_e2e import TuneE2EParams, tune_e2e


def _params(tiny_dir, out, **kw):
    base = dict(spec="W4A16-g32", samples=4, seqlen=32, lr=1e-2, grad_accum=2, warmup_ratio=0.0, epochs=2)
    return TuneE2EParams(str(tiny_dir), str(out), **{**base, **kw})


def test_only_step_sizes_change_and_codes_are_bit_identical(tiny_dir, tmp_path):
    result = tune_e2e(_params(tiny_dir, tmp_path / "e2e"), device="cpu")
    assert (
        result.steps == 4
        and result.trainable_params
        == sum(n * -(-k // 32) for n, k in [(64, 64), (32, 64), (32, 64), (64, 64), (96, 64), (96, 64), (64, 96)]) * 3
    )
    original = load_model(tiny_dir)
    adapter = adapter_for(original.config)
    before = model_qparams(original, adapter, parse_spec("W4A16-g32"))
    stage = open_stage(tmp_path / "e2e")
    after = stage_qparams(stage)
    assert stage.spec == "W4A16-g32" and after.keys() == before.keys()
    for key in before:
        if key.endswith(("codes", "zero")):
            assert torch.equal(before[key], after[key]), key
    changed = [k for k in before if k.endswith("scale") and not torch.equal(before[k], after[k])]
    assert len(changed) == 21  # every linear's step sizes moved
    # the saved float weights are exactly the dequantized codes with the trained scales
    trained = load_model(tmp_path / "e2e")
    for (name, p), (_, q) in zip(trained.named_parameters(), original.named_parameters()):
        if ".layers." not in name or "norm" in name:
            assert torch.equal(p, q), name  # embeddings, norms, head untouched
    lin = adapter.linears(adapter.layers(trained)[1])[adapter.q]
    k = lambda w: after[f"layers.1.{adapter.q}.{w}"]  # noqa: E731
    expected = (k("codes").float() - k("zero").repeat_interleave(32, 1)) * k("scale").repeat_interleave(32, 1)
    assert torch.equal(lin.weight, expected)


def test_resume_equals_uninterrupted_run(tiny_dir, tmp_path, monkeypatch):
    tune_e2e(_params(tiny_dir, tmp_path / "full"), device="cpu", save_every=1)

    class DiesAfterTwoSaves(BlockJournal):
        saves = 0

        def save(self, index, tensors):
            super().save(index, tensors)
            DiesAfterTwoSaves.saves += 1
            if DiesAfterTwoSaves.saves == 2:
                raise KeyboardInterrupt

    monkeypatch.setattr(base, "BlockJournal", DiesAfterTwoSaves)
    with pytest.raises(KeyboardInterrupt):
        tune_e2e(_params(tiny_dir, tmp_path / "resumed"), device="cpu", save_every=1)
    assert not (tmp_path / "resumed").exists()
    monkeypatch.setattr(base, "BlockJournal", BlockJournal)
    tune_e2e(_params(tiny_dir, tmp_path / "resumed"), device="cpu", save_every=1)
    full, resumed = stage_qparams(open_stage(tmp_path / "full")), stage_qparams(open_stage(tmp_path / "resumed"))
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_needs_a_weight_only_spec(tiny_dir, tmp_path):
    with pytest.raises(QtoolError, match="has no quantized weights"):
        tune_e2e(TuneE2EParams(str(tiny_dir), str(tmp_path / "x")), device="cpu")
    with pytest.raises(QtoolError, match="not weight-only"):
        tune_e2e(TuneE2EParams(str(tiny_dir), str(tmp_path / "x"), spec="W4A4"), device="cpu")
