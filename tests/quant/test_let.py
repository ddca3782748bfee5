"""LET: the learned equivalent transformation folds exactly for every pair."""

from __future__ import annotations

import pytest
import torch
from blockwise_helpers import block_and_inputs, block_output

from qtool.quant.let import apply_let, let_plan

ALL_PAIRS = ("attn_in", "mlp_in", "v_o", "mlp_mid", "qk")


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_let_folds_exactly_for_every_pair(family):
    model, adapter, block, hidden, kwargs = block_and_inputs(family)
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
    ref = block_output(block, base, hidden, kwargs)
    got = block_output(block, apply_let(base, let, plan), hidden, kwargs)
    assert torch.allclose(got, ref, atol=1e-10, rtol=0)
