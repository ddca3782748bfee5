"""train-blockap: exact folding, straight-through gradients, resume, clear errors, learned eval."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch.func import functional_call

from conftest import tiny_model
from qtool.core.checkpoint import BlockJournal, layer_key
from qtool.core.errors import QtoolError
from qtool.core.quantizer import dequantize_weight, quantize_weight
from qtool.core.spec import parse_spec
from qtool.models.adapters import adapter_for
from qtool.models.blockwise import capture_block_inputs
from qtool.quant import blockwise_train
from qtool.quant.block_losses import MSELoss
from qtool.quant.blockwise_train import PRESETS, BlockState, TrainSettings, train_blocks
from qtool.quant.fakequant import apply_spec
from qtool.quant.learned_weights import fake_quant_grouped, step_qparams
from qtool.quant.let import apply_let, let_plan
from qtool.quant.qparams import QPARAMS

ALL_PAIRS = ("attn_in", "mlp_in", "v_o", "mlp_mid", "qk")


def _block_and_inputs(family):
    model = tiny_model(family).double()
    adapter = adapter_for(model.config)
    hidden, kwargs = capture_block_inputs(model, adapter, torch.randint(0, 256, (2, 16)), torch.device("cpu"))
    return model, adapter, adapter.layers(model)[1], hidden, kwargs


def _out(block, params, hidden, kwargs):
    out = functional_call(block, params, (hidden,), kwargs)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_let_folds_exactly_for_every_pair(family):
    model, adapter, block, hidden, kwargs = _block_and_inputs(family)
    base = {n: p.detach() for n, p in block.named_parameters()}
    plan = let_plan(adapter, model.config, base, ALL_PAIRS, shift=True)
    assert {p.name for p in plan.pairs} == set(ALL_PAIRS)
    assert any(p.shift for p in plan.pairs) == (family == "opt")  # RMSNorm has no bias to absorb a shift
    gen = torch.Generator().manual_seed(1)
    let = {}
    for pair in plan.pairs:
        if pair.name == "qk":
            size = plan.kv_heads * plan.head_dim // 2
        elif pair.name == "v_o":
            size = base[f"{pair.producer}.weight"].shape[0]
        else:
            size = base[f"{pair.consumers[0]}.weight"].shape[1]
        let[f"{pair.name}.log_scale"] = torch.randn(size, generator=gen, dtype=torch.float64)
        if pair.shift:
            let[f"{pair.name}.shift"] = torch.randn(size, generator=gen, dtype=torch.float64)
    ref = _out(block, base, hidden, kwargs)
    got = _out(block, apply_let(base, let, plan), hidden, kwargs)
    assert torch.allclose(got, ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_block_state_fold_keeps_the_float_block(family, preset):
    """With quantization off, the folded weights of a freshly initialised state compute the same block."""
    model, adapter, block, hidden, kwargs = _block_and_inputs(family)
    spec = parse_spec("W4A8KV8-g32")
    stats, _ = _stats(block, adapter, hidden, kwargs)
    state = BlockState(block, adapter, model.config, spec, PRESETS[preset], stats, 0, 3, alpha=0.5)
    with torch.no_grad():
        for params in state.groups.get("let", {}).values():
            params.add_(0.3 * torch.randn_like(params))
    folded, qparams = state.fold()
    assert torch.allclose(
        _out(block, folded, hidden, kwargs), _out(block, state.base, hidden, kwargs), atol=1e-10, rtol=0
    )
    for scale, zero in qparams.values():
        assert zero.min() >= 0 and zero.max() <= spec.w_levels - 1 and torch.equal(zero, zero.round())


def _stats(block, adapter, hidden, kwargs):
    from qtool.quant.stats import block_stats

    with torch.no_grad():
        return block_stats(block, adapter, 0, hidden, kwargs, 1)


def test_straight_through_gradients_explicit_example():
    spec = parse_spec("W2A16")  # 4 levels per row
    w = torch.tensor([[0.0, 0.4, 1.0, 2.9]], requires_grad=True)
    scale = torch.tensor([[1.0]], requires_grad=True)
    zero = torch.tensor([[0.3]], requires_grad=True)
    s, z = step_qparams(w, {"scale": scale, "zero": zero}, spec)
    out = fake_quant_grouped(w, s, z, spec)
    assert out.tolist() == [[0.0, 0.0, 1.0, 3.0]]
    out.sum().backward()
    assert w.grad.tolist() == [[1.0, 1.0, 1.0, 1.0]]  # identity through round, all codes in range
    # d/ds [(round(w/s) + z - z) * s] with round passed straight through: round(w/s) - w/s per element
    assert scale.grad.item() == pytest.approx((0 - 0.0) + (0 - 0.4) + (1 - 1.0) + (3 - 2.9))
    w2 = torch.tensor([[0.0, 9.0]], requires_grad=True)  # 9 clamps to the top code: no gradient
    fake_quant_grouped(w2, s.detach(), z.detach(), spec).sum().backward()
    assert w2.grad.tolist() == [[1.0, 0.0]]


def _train(model, journal_dir, preset="omniquant"):
    adapter = adapter_for(model.config)
    settings = TrainSettings(epochs=2, batch=2, seed=0, lr=dict(PRESETS[preset].lr), cosine=True)
    journal = BlockJournal(journal_dir / "out", "fp")
    windows = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    return train_blocks(
        model, adapter, parse_spec("W3A8-g32"), PRESETS[preset], settings, windows, torch.device("cpu"), journal
    )


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    model = tiny_model("llama")
    whole, _ = _train(model, tmp_path / "a")
    real = blockwise_train.fit_block

    def killed_at_block_2(*args, **kwargs):
        if args[9] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(blockwise_train, "fit_block", killed_at_block_2)
    with pytest.raises(KeyboardInterrupt):
        _train(tiny_model("llama"), tmp_path / "b")
    monkeypatch.setattr(blockwise_train, "fit_block", real)
    resumed_model = tiny_model("llama")
    resumed, _ = _train(resumed_model, tmp_path / "b")
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    for (name, a), b in zip(model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name


def test_nan_loss_stops_with_a_message_naming_the_block(tmp_path, monkeypatch):
    monkeypatch.setattr(MSELoss, "__call__", lambda self, out, targets: (out * float("nan")).mean())
    with pytest.raises(QtoolError, match="block 0: training loss became nan"):
        _train(tiny_model("opt"), tmp_path)


def test_eval_quantizes_with_the_learned_scales(tmp_path):
    model = tiny_model("llama")
    qparams, _ = _train(model, tmp_path, preset="efficientqat")
    adapter = adapter_for(model.config)
    spec = parse_spec("W3A16-g32")
    linear = adapter.linears(adapter.layers(model)[1])["mlp.down_proj"]
    scale, zero = qparams[layer_key(1, "mlp.down_proj", "scale")], qparams[layer_key(1, "mlp.down_proj", "zero")]
    codes, scale16, zero = quantize_weight(linear.weight.detach(), spec, scale, zero)
    assert torch.equal(scale16, scale.half().float())  # learned scales are used at fp16 precision
    expected = dequantize_weight(codes, scale16, zero, spec.group)
    apply_spec(model, adapter, spec, qparams=qparams)
    assert torch.equal(linear.weight.detach(), expected)


def test_stage_writes_weights_qparams_and_spec(tmp_path, tiny_dir):
    from qtool.stages.eval import EvalParams, evaluate
    from qtool.stages.train_blockap import BlockAPParams, train_blockap

    out = tmp_path / "stage"
    params = BlockAPParams(str(tiny_dir), str(out), preset="abq", spec="W2*A8-g32", samples=2, seqlen=16, epochs=1)
    train_blockap(params, device="cpu")
    tensors = load_file(out / f"qtool-{QPARAMS}.safetensors")
    assert layer_key(0, "self_attn.q_proj", "scale") in tensors and layer_key(2, "mlp.down_proj", "zero") in tensors
    codes = tensors[layer_key(0, "self_attn.q_proj", "codes")]
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 4  # W2*: 5 levels
    result = evaluate(EvalParams(str(out), seqlen=16, windows=2), device="cpu")
    assert result.spec == "W2*A8-g32" and result.ppl > 0
    with pytest.raises(QtoolError, match="holds W2\\*A8-g32 weights"):
        evaluate(EvalParams(str(out), spec="W4A16-g32", seqlen=16, windows=2), device="cpu")
