"""RPTQ's reorder fused into the norms: each reordered norm reads its input permuted, so its
output comes out in the clusters' channel order while the residual stream keeps its own."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from qtool.core.checkpoint import layer_key
from qtool.models.adapters import Adapter


class NormGather:
    """Forward pre-hook on a norm: it reads its input at `perm` and so writes its output reordered
    (with its weight stored permuted). The paper's reorder fused into LayerNorm; the residual
    stream itself stays in the original order."""

    def __init__(self, perm: torch.Tensor):
        self.perm = perm

    def __call__(self, module, args):
        x = args[0]
        return (x.index_select(-1, self.perm.to(x.device)), *args[1:])


def install_gathers(model: nn.Module, adapter: Adapter, tensors: Mapping[str, torch.Tensor]) -> list:
    """Give every reordered norm its output gather; returns the hook handles."""
    norms = {p.name: p.producer for p in adapter.fold_pairs(model.config) if p.kind == "norm"}
    handles = []
    for i, block in enumerate(adapter.layers(model)):
        for site, path in norms.items():
            gather = NormGather(tensors[layer_key(i, site, "perm")])
            handles.append(block.get_submodule(path).register_forward_pre_hook(gather))
    return handles
