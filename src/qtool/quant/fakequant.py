"""Apply a QuantSpec to a float model by fake quantization (quantize, then dequantize).

Weights are replaced by their dequantized values; activations are quantized on the fly by forward
hooks on every linear of every block (inputs) and on the key and value projections (outputs, for
the KV cache). Embeddings and the LM head stay in float, as in the literature.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from qtool.errors import QtoolError
from qtool.models.adapters import Adapter
from qtool.quant.qparams import qparam_key
from qtool.quant.quantizer import fake_quant, fake_quant_per_token, fake_quant_weight, minmax_qparams
from qtool.spec import QuantSpec


def stat_prefix(block: int, linear: str, where: str) -> str:
    """Prefix of the calibration statistics of one tensor: where is "input" or "output"."""
    return f"layers.{block}.{linear}.{where}"


def stat_key(block: int, linear: str, where: str, what: str) -> str:
    """Name of one calibration statistic; what is min, max or absmax."""
    return f"{stat_prefix(block, linear, where)}.{what}"


class InputQuantizer:
    """Forward pre-hook: fake-quantize a linear's input per token, or per tensor from a static range."""

    def __init__(self, bits: int, static_range: tuple[torch.Tensor, torch.Tensor] | None = None, ste: bool = False):
        self.levels = 2**bits
        self.bits = bits
        self.ste = ste
        self.qparams = None
        if static_range is not None:
            self.qparams = minmax_qparams(static_range[0].min(), static_range[1].max(), self.levels, sym=False)

    def __call__(self, module, args):
        x = args[0]
        if self.qparams is None:
            return (fake_quant_per_token(x, self.bits, ste=self.ste), *args[1:])
        scale, zero = (p.to(x.device) for p in self.qparams)
        return (fake_quant(x, scale, zero, self.levels, ste=self.ste), *args[1:])


class HeadOutputQuantizer:
    """Forward hook: fake-quantize a projection's output per token and head (the KV cache)."""

    def __init__(self, bits: int, head_dim: int, ste: bool = False):
        self.bits, self.head_dim, self.ste = bits, head_dim, ste

    def __call__(self, module, args, output):
        return fake_quant_per_token(output, self.bits, width=self.head_dim, ste=self.ste)


def activation_hooks(block: nn.Module, adapter: Adapter, spec: QuantSpec, head_dim: int, index: int = 0,
                     stats: Mapping[str, torch.Tensor] | None = None, ste: bool = False) -> list:
    """Hooks that fake-quantize one block's linear inputs and its KV outputs as `spec` says."""
    handles = []
    for name, linear in adapter.linears(block).items():
        if spec.quantizes_activations:
            static = None
            if spec.a_static:
                static = tuple(stats[stat_key(index, name, "input", w)] for w in ("min", "max"))
            handles.append(linear.register_forward_pre_hook(InputQuantizer(spec.a_bits, static, ste)))
        if spec.quantizes_kv and name in (adapter.k, adapter.v):
            handles.append(linear.register_forward_hook(HeadOutputQuantizer(spec.kv_bits, head_dim, ste)))
    return handles


@torch.no_grad()
def apply_spec(model: nn.Module, adapter: Adapter, spec: QuantSpec, stats: Mapping[str, torch.Tensor] | None = None,
               qparams: Mapping[str, torch.Tensor] | None = None) -> list:
    """Fake-quantize `model` in place for `spec`; returns the hook handles (remove() undoes hooks,
    not the weight rounding). Weights use the learned scale/zero in `qparams` where it has them
    (a train-blockap stage), round-to-nearest ranges elsewhere."""
    if spec.quantizes_activations and spec.a_granularity == "cluster":
        raise QtoolError(f"{spec.name} needs channel clusters: run `qtool reorder` on a calibrate stage and evaluate that")
    if spec.quantizes_activations and spec.a_static and stats is None:
        raise QtoolError(f"{spec.name} uses static activation ranges: evaluate a calibrate stage (`qtool calibrate`)")
    _, _, head_dim = adapter.attention_shape(model.config)
    handles = []
    for index, block in enumerate(adapter.layers(model)):
        for name, linear in adapter.linears(block).items():
            if spec.quantizes_weights:
                learned = [qparams.get(qparam_key(index, name, w)) for w in ("scale", "zero")] if qparams else [None, None]
                linear.weight.copy_(fake_quant_weight(linear.weight, spec, *learned))
        handles += activation_hooks(block, adapter, spec, head_dim, index, stats)
    return handles
