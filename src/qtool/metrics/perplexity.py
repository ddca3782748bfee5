"""Perplexity over fixed windows: ppl = exp(mean over windows of the mean next-token NLL)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


@torch.no_grad()
def window_nlls(
    model,
    windows: torch.Tensor,
    device: torch.device,
    batch_size: int = 1,
    on_batch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Mean next-token negative log-likelihood (fp32) of each window [n, L] -> [n]."""
    nlls = []
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(device)
        logits = model(batch, use_cache=False).logits.float()
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="none")
        nlls.append(loss.view(batch.shape[0], -1).mean(1).cpu())
        if on_batch is not None:
            on_batch(batch.shape[0])
    return torch.cat(nlls)


def perplexity(nlls: torch.Tensor) -> float:
    return math.exp(nlls.double().mean().item())
