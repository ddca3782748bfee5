"""Weight quantizers with learnable parameters, in the shared code/scale/zero representation.

* LWC (OmniQuant, ABQ): per row and group, clipping factors sigmoid(gamma) on the max and
  sigmoid(beta) on the min; scale and zero follow from the clipped range by the same formula as
  round-to-nearest (`minmax_qparams`). Symmetric specs (and W2* bit balance) use gamma only.
* Learned step (EfficientQAT Block-AP): scale and zero are parameters themselves; the zero point is
  rounded straight-through and clamped to the code range, exactly as it is when saved.
"""

from __future__ import annotations

import torch

from qtool.core.quantizer import (
    EPS,
    clamp_codes,
    fake_quant,
    from_groups,
    minmax_qparams,
    round_ste,
    to_groups,
    weight_qparams,
)
from qtool.core.spec import QuantSpec

LWC_INIT = 4.0  # sigmoid(4) = 0.982: start next to the full (unclipped) range


def lwc_init(w: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    n, groups = to_groups(w, spec.group).shape[:2]
    init = {"gamma": torch.full((n, groups), LWC_INIT)}
    if not spec.w_sym:
        init["beta"] = torch.full((n, groups), LWC_INIT)
    return init


def lwc_qparams(w: torch.Tensor, p: dict[str, torch.Tensor], spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    wg = to_groups(w, spec.group).float()
    upper = torch.sigmoid(p["gamma"])
    lower = upper if spec.w_sym else torch.sigmoid(p["beta"])
    return minmax_qparams(wg.amin(-1) * lower, wg.amax(-1) * upper, spec.w_levels, spec.w_sym)


def step_init(w: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    scale, zero = weight_qparams(w, spec)
    return {"scale": scale, "zero": zero}


def step_qparams(w: torch.Tensor, p: dict[str, torch.Tensor], spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    zero = clamp_codes(round_ste(p["zero"]), spec.w_levels - 1)
    return p["scale"].clamp(min=EPS), zero


QUANTIZERS = {"lwc": (lwc_init, lwc_qparams), "step": (step_init, step_qparams)}


def fake_quant_grouped(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Differentiable (straight-through) fake quantization of w [N, K] with [N, groups] qparams."""
    wg = to_groups(w, spec.group)
    return from_groups(fake_quant(wg, scale[..., None], zero[..., None], spec.w_levels, ste=True), w.shape[1])
