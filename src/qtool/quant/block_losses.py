"""Losses of block-wise training: what the quantized block's output is compared against.

Every loss reads a `targets` dict: "fp" is the float block applied to the float-chain inputs;
ABQ also uses "fp_qin" (the float block applied to the quantized-chain inputs) and the attention
probabilities of the float ("attn_fp") and quantized ("attn_q") block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qtool.core import distributed


class MSELoss:
    needs_attention = False
    needs_qin_target = False

    def __call__(self, out: torch.Tensor, targets: dict) -> torch.Tensor:
        return F.mse_loss(out.float(), targets["fp"].float())


def _symmetric_kl(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """KL(p||q) + KL(q||p) of attention rows, averaged over rows."""
    logp, logq = p.float().clamp(min=eps).log(), q.float().clamp(min=eps).log()
    return ((p.float() - q.float()) * (logp - logq)).sum(-1).mean()


class ABQLoss:
    """ABQ-LLM's objective: for both targets (float inputs, quantized inputs) an MSE term and the
    double log-cosine term -log|mean cos(out, target)|, plus a symmetric KL between the
    attention maps of the float and the quantized block."""

    needs_attention = True
    needs_qin_target = True

    def __call__(self, out: torch.Tensor, targets: dict) -> torch.Tensor:
        out = out.float()
        loss = _symmetric_kl(targets["attn_fp"], targets["attn_q"])
        for key in ("fp", "fp_qin"):
            target = targets[key].float()
            loss = loss + F.mse_loss(out, target)
            # the mean cosine of the global batch (on several ranks, each holding a slice of it)
            loss = loss - distributed.mean(F.cosine_similarity(out, target, dim=-1).mean()).abs().log()
        return loss


LOSSES = {"mse": MSELoss, "abq": ABQLoss}
