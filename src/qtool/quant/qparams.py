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

from qtool.core.checkpoint import StageDir, layer_key
from qtool.core.errors import QtoolError
from qtool.core.quantizer import quantize_weight
from qtool.core.spec import QuantSpec, parse_spec, same_weight_format
from qtool.models.adapters import Adapter

QPARAMS = "qparams"


def stage_qparams(stage: StageDir) -> dict[str, torch.Tensor] | None:
    return stage.tensors(QPARAMS) if stage.has_tensors(QPARAMS) else None


def learned_qparams(stage: StageDir, spec: QuantSpec) -> dict[str, torch.Tensor] | None:
    """The stage's learned weight parameters for `spec` (None when it has none), or a one-line
    error when they were learned for another weight format: a spec may change the activation and
    KV parts of a quantized stage, never its weights."""
    stored = stage_qparams(stage)
    if stored is not None and stage.spec and not same_weight_format(spec, parse_spec(stage.spec)):
        raise QtoolError(
            f"{stage.path} holds {stage.spec} weights, not {spec.name}; a --spec must keep that weight part "
            "(activations and KV may change), or drop --spec to use the stage's own"
        )
    return stored


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
