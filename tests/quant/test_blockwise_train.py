"""Block-wise training: folding keeps the float block, resume after a kill is exact, a nan loss names its block."""

from __future__ import annotations

import pytest
import torch
from blockwise_helpers import block_and_inputs, block_output, train_tiny

from conftest import tiny_model
from qtool.core.errors import QtoolError
from qtool.core.spec import parse_spec
from qtool.quant import blockwise_train
from qtool.quant.block_losses import MSELoss
from qtool.quant.blockwise_train import PRESETS, BlockState


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_block_state_fold_keeps_the_float_block(family, preset):
    """With quantization off, the folded weights of a freshly initialised state compute the same block."""
    model, adapter, block, hidden, kwargs = block_and_inputs(family)
    spec = parse_spec("W4A8KV8-g32")
    stats, _ = _stats(block, adapter, hidden, kwargs)
    state = BlockState(block, adapter, model.config, spec, PRESETS[preset], stats, 0, 3, alpha=0.5)
    with torch.no_grad():
        for params in state.groups.get("let", {}).values():
            params.add_(0.3 * torch.randn_like(params))
    folded, qparams = state.fold()
    assert torch.allclose(
        block_output(block, folded, hidden, kwargs), block_output(block, state.base, hidden, kwargs), atol=1e-10, rtol=0
    )
    for _scale, zero in qparams.values():
        assert zero.min() >= 0 and zero.max() <= spec.w_levels - 1 and torch.equal(zero, zero.round())


def _stats(block, adapter, hidden, kwargs):
    from qtool.quant.stats import block_stats

    with torch.no_grad():
        return block_stats(block, adapter, 0, hidden, kwargs, 1)


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    model = tiny_model("llama")
    whole, _ = train_tiny(model, tmp_path / "a")
    real = blockwise_train.fit_block

    def killed_at_block_2(*args, **kwargs):
        if args[9] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(blockwise_train, "fit_block", killed_at_block_2)
    with pytest.raises(KeyboardInterrupt):
        train_tiny(tiny_model("llama"), tmp_path / "b")
    monkeypatch.setattr(blockwise_train, "fit_block", real)
    resumed_model = tiny_model("llama")
    resumed, _ = train_tiny(resumed_model, tmp_path / "b")
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    for (name, a), b in zip(model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name


def test_nan_loss_stops_with_a_message_naming_the_block(tmp_path, monkeypatch):
    monkeypatch.setattr(MSELoss, "__call__", lambda self, out, targets: (out * float("nan")).mean())
    with pytest.raises(QtoolError, match="block 0: training loss became nan"):
        train_tiny(tiny_model("opt"), tmp_path)
