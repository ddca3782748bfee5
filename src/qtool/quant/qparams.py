"""Learned weight quantization parameters of a stage: one file, one key scheme, for every method.

`qtool-qparams.safetensors` holds, for every block linear, `layers.{i}.{linear}.scale` (fp32
[N, groups], used at fp16 precision: `quantize_weight` rounds it), `.zero` (fp32, integer-valued,
[N, groups]) and `.codes` (uint8 [N, K]). Any stage that decides weight quantization (block-wise
training, E2E-QP, RTN export) writes it; a child stage inherits it until it writes its own.
Evaluation and packing read it instead of computing fresh round-to-nearest ranges.
"""

from __future__ import annotations

from functools import partial

import torch

from qtool.core.checkpoint import Stage, layer_key
from qtool.core.quantizer import quantize_weight
from qtool.core.spec import QuantSpec
from qtool.models.adapters import Adapter

QPARAMS = "qparams"


def stage_qparams(stage: Stage) -> dict[str, torch.Tensor] | None:
    return stage.tensors(QPARAMS) if stage.has_tensors(QPARAMS) else None


@torch.no_grad()
def model_qparams(
    model, adapter: Adapter, spec: QuantSpec, stored: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Codes, scales and zeros of every block linear: the stored scales and zeros where given
    (codes recomputed from the weights with them), round-to-nearest ranges otherwise."""
    out = {}
    for index, block in enumerate(adapter.layers(model)):
        for name, linear in adapter.linears(block).items():
            key = partial(layer_key, index, name)
            scale = zero = None
            if stored is not None:
                scale, zero = stored[key("scale")], stored[key("zero")]
            codes, scale, zero = quantize_weight(linear.weight.float(), spec, scale, zero)
            out.update({key("codes"): codes, key("scale"): scale.float(), key("zero"): zero.float()})
    return out
