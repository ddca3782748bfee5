"""Apply a QuantSpec to a float model by fake quantization (quantize, then dequantize).

Weights are replaced by their dequantized values; activations are quantized on the fly by forward
hooks on every linear of every block (inputs) and on the key and value projections (outputs, for
the KV cache). Embeddings and the LM head stay in float, as in the literature. With `-cluster`
(RPTQ) every activation and the K and V outputs take one range per channel cluster of a reorder
stage; without it the KV cache is quantized per token and head.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from qtool.core.checkpoint import layer_key
from qtool.core.errors import QtoolError
from qtool.core.quantizer import (
    fake_quant,
    fake_quant_per_token,
    fake_quant_weight,
    minmax_qparams,
)
from qtool.core.spec import QuantSpec
from qtool.models.adapters import Adapter


class ActQuantizer:
    """Fake-quantize the last dimension in contiguous channel clusters (`bounds`: offsets 0..C).

    One mechanism for every activation range: static per cluster from calibration min/max
    (per-tensor static is the one-cluster case) or dynamic per token and cluster (per-token
    dynamic is the one-cluster case). `ste` lets gradients through for block-wise training.
    """

    def __init__(
        self,
        bits: int,
        bounds: torch.Tensor,
        static_range: tuple[torch.Tensor, torch.Tensor] | None = None,
        ste: bool = False,
    ):
        self.bits, self.levels, self.ste = bits, 2**bits, ste
        self.sizes = torch.diff(bounds).tolist()
        self.qparams = None
        if static_range is not None:
            sizes = torch.tensor(self.sizes)
            lo = torch.stack([c.min() for c in static_range[0].split(self.sizes)])
            hi = torch.stack([c.max() for c in static_range[1].split(self.sizes)])
            self.qparams = tuple(p.repeat_interleave(sizes) for p in minmax_qparams(lo, hi, self.levels, sym=False))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.qparams is not None:
            scale, zero = (p.to(x.device) for p in self.qparams)
            return fake_quant(x, scale, zero, self.levels, ste=self.ste)
        return fake_quant_clusters(x, self.bits, self.sizes, self.ste)


def fake_quant_clusters(x: torch.Tensor, bits: int, sizes, ste: bool = False) -> torch.Tensor:
    """Dynamic quantization with one range per token and contiguous channel cluster of `sizes`
    (ActQuantizer's dynamic case; plain torch and host-side sizes, so torch.compile can fuse it)."""
    if len(sizes) == 1:
        return fake_quant_per_token(x, bits, ste=ste)
    return torch.cat([fake_quant_per_token(c, bits, ste=ste) for c in x.split(list(sizes), -1)], -1)


class InputHook:
    """Forward pre-hook: quantize a linear's input."""

    def __init__(self, quantizer):
        self.quantizer = quantizer

    def __call__(self, module, args):
        return (self.quantizer(args[0]), *args[1:])


class OutputHook(InputHook):
    """Forward hook: quantize a projection's output (the KV cache)."""

    def __call__(self, module, args, output):
        return self.quantizer(output)


def _check(spec: QuantSpec, stats, clusters) -> None:
    cluster = spec.a_granularity == "cluster"
    if cluster and (spec.quantizes_activations or spec.quantizes_kv) and clusters is None:
        raise QtoolError(
            f"{spec.name} needs channel clusters: run `qtool reorder` on a calibrate stage and evaluate that"
        )
    static_kv = cluster and spec.quantizes_kv and spec.a_static
    if ((spec.quantizes_activations and spec.a_static) or static_kv) and stats is None:
        raise QtoolError(f"{spec.name} uses static activation ranges: evaluate a calibrate stage (`qtool calibrate`)")


def activation_hooks(
    block: nn.Module,
    adapter: Adapter,
    spec: QuantSpec,
    head_dim: int,
    index: int = 0,
    stats: Mapping[str, torch.Tensor] | None = None,
    ste: bool = False,
    clusters: Mapping[str, torch.Tensor] | None = None,
) -> list:
    """Hooks that fake-quantize one block's linear inputs and its KV outputs as `spec` says.

    `clusters` maps a stat prefix (`layer_key(block, linear, where)`) to the cluster bounds of that tensor, as
    `qtool reorder` writes them; `-cluster` specs need it. Without clusters the KV cache is
    quantized per token and head."""
    _check(spec, stats, clusters)
    cluster = spec.a_granularity == "cluster"

    def quantizer(bits: int, prefix: str, width: int) -> ActQuantizer:
        bounds = clusters[prefix] if cluster else torch.tensor([0, width])
        static = tuple(stats[f"{prefix}.{w}"] for w in ("min", "max")) if spec.a_static else None
        return ActQuantizer(bits, bounds, static, ste)

    handles = []
    for name, linear in adapter.linears(block).items():
        if spec.quantizes_activations:
            q = quantizer(spec.a_bits, layer_key(index, name, "input"), linear.in_features)
            handles.append(linear.register_forward_pre_hook(InputHook(q)))
        if spec.quantizes_kv and name in (adapter.k, adapter.v):
            if cluster:
                q = quantizer(spec.kv_bits, layer_key(index, name, "output"), linear.out_features)
            else:
                q = lambda x, bits=spec.kv_bits: fake_quant_per_token(x, bits, width=head_dim, ste=ste)  # noqa: E731
            handles.append(linear.register_forward_hook(OutputHook(q)))
    return handles


@torch.no_grad()
def apply_spec(
    model: nn.Module,
    adapter: Adapter,
    spec: QuantSpec,
    stats: Mapping[str, torch.Tensor] | None = None,
    qparams: Mapping[str, torch.Tensor] | None = None,
    clusters: Mapping[str, torch.Tensor] | None = None,
) -> list:
    """Fake-quantize `model` in place for `spec`; returns the hook handles (remove() undoes hooks,
    not the weight rounding). Weights use the learned scale/zero in `qparams` where it has them
    (a trained stage), round-to-nearest ranges elsewhere; activations as `activation_hooks`."""
    _check(spec, stats, clusters)
    _, _, head_dim = adapter.attention_shape(model.config)
    handles = []
    for index, block in enumerate(adapter.layers(model)):
        if spec.quantizes_weights:
            for name, linear in adapter.linears(block).items():
                learned = (
                    [qparams.get(layer_key(index, name, w)) for w in ("scale", "zero")] if qparams else [None, None]
                )
                linear.weight.copy_(fake_quant_weight(linear.weight, spec, *learned))
        handles += activation_hooks(block, adapter, spec, head_dim, index, stats, clusters=clusters)
    return handles
