"""Step-size linears: the gradient of the step sizes against finite differences."""

import pytest
import torch

from qtool.quant.step_sizes import StepSizeLinear


def test_step_size_gradient_matches_finite_differences():
    torch.manual_seed(0)
    codes = torch.randint(0, 8, (3, 12), dtype=torch.uint8)
    scale, zero = torch.rand(3, 2, dtype=torch.float64) + 0.1, torch.randint(0, 8, (3, 2)).double()
    module = StepSizeLinear(codes, scale, zero, group=8, bias=None).double()
    module.scale.data = scale.clone()
    x, y = torch.randn(5, 12, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    loss = lambda: ((module(x) - y) ** 2).sum()  # noqa: E731
    loss().backward()
    eps = 1e-6
    for r in range(3):
        for g in range(2):
            with torch.no_grad():
                module.scale[r, g] += eps
                up = loss().item()
                module.scale[r, g] -= 2 * eps
                down = loss().item()
                module.scale[r, g] += eps
            assert module.scale.grad[r, g].item() == pytest.approx((up - down) / (2 * eps), rel=1e-6, abs=1e-8)
