"""E2E-QP (EfficientQAT's second stage): train only the per-group step sizes, codes frozen.

Every block linear becomes a `StepSizeLinear` that holds its integer codes as a uint8 buffer (a
quarter of fp32 weights' memory, no gradient, no optimizer state), its zero points frozen, and
its fp32 step sizes as the only trainable parameters. The forward pass dequantizes on the fly:
w = (codes - zero) * scale, so d loss / d scale = sum over the group of (codes - zero) * d loss / d w.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from qtool.core.checkpoint import layer_key
from qtool.core.quantizer import expand_groups
from qtool.models.adapters import Adapter


class StepSizeLinear(nn.Module):
    """A linear layer of frozen codes and zeros with trainable per-group step sizes."""

    def __init__(
        self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int, bias: torch.Tensor | None
    ):
        super().__init__()
        self.register_buffer("codes", codes.to(torch.uint8))
        self.register_buffer("zero", zero.float())
        self.scale = nn.Parameter(scale.float().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.group = group
        self.in_features, self.out_features = codes.shape[1], codes.shape[0]

    def weight_fp32(self) -> torch.Tensor:
        k = self.in_features
        return (self.codes.float() - expand_groups(self.zero, k, self.group)) * expand_groups(self.scale, k, self.group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_fp32()
        if torch.is_autocast_enabled(x.device.type):
            return F.linear(x, w, self.bias)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def install_step_size_linears(
    model: nn.Module, adapter: Adapter, qparams: dict[str, torch.Tensor], group: int
) -> list[StepSizeLinear]:
    """Replace every block linear by a StepSizeLinear built from `qparams`; freeze everything else."""
    for p in model.parameters():
        p.requires_grad_(False)
    installed = []
    for index, block in enumerate(adapter.layers(model)):
        for name, linear in adapter.linears(block).items():
            key = partial(layer_key, index, name)
            module = StepSizeLinear(
                qparams[key("codes")], qparams[key("scale")], qparams[key("zero")], group, linear.bias
            )
            module.to(linear.weight.device)
            parent_name, _, leaf = name.rpartition(".")
            setattr(block.get_submodule(parent_name) if parent_name else block, leaf, module)
            installed.append(module)
    return installed


def export_qparams(model: nn.Module, adapter: Adapter) -> dict[str, torch.Tensor]:
    """Codes, trained scales and zeros of every StepSizeLinear, keyed like qtool-qparams."""
    out = {}
    for index, block in enumerate(adapter.layers(model)):
        for name in adapter.linear_names():
            module = block.get_submodule(name)
            out[layer_key(index, name, "codes")] = module.codes
            out[layer_key(index, name, "scale")] = module.scale.detach().float()
            out[layer_key(index, name, "zero")] = module.zero
    return out


@torch.no_grad()
def restore_linears(model: nn.Module, adapter: Adapter) -> None:
    """Turn StepSizeLinears back into nn.Linear holding the dequantized weights (for saving)."""
    dtype = model.get_input_embeddings().weight.dtype
    for block in adapter.layers(model):
        for name in adapter.linear_names():
            module = block.get_submodule(name)
            linear = nn.Linear(
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                device=module.codes.device,
                dtype=dtype,
            )
            linear.weight.copy_(module.weight_fp32())
            if module.bias is not None:
                linear.bias.copy_(module.bias)
            parent_name, _, leaf = name.rpartition(".")
            setattr(block.get_submodule(parent_name) if parent_name else block, leaf, linear)
