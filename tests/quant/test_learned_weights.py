"""Learned weight quantizers: straight-through gradients by hand."""

from __future__ import annotations

import pytest
import torch

from qtool.core.spec import parse_spec
from qtool.quant.learned_weights import fake_quant_grouped, step_qparams


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
