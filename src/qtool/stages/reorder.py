"""`qtool reorder`: RPTQ's channel reordering as a stage (the math is in `qtool.quant.rptq`).

Reads a calibrate stage, clusters the channels of every reorder site, and writes a stage whose
weights have the permutations folded in. It holds:

* model*.safetensors: permuted weights, loadable by transformers. The norms feeding q/k/v and the
  MLP are stored with permuted weights, and their output order comes from the gather that
  `qtool.runtime.loader.load` installs from this stage's tensors (the paper's reorder fused into
  LayerNorm); transformers alone loads a model without those gathers, which is not the model.
* qtool-reorder.safetensors: per block and site `perm`, `inverse` and `bounds` (cluster offsets).
* qtool-calibrate.safetensors: the statistics in the new channel order, so every later reader
  (static and per-cluster ranges, later methods) sees them aligned with the weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from qtool.core.checkpoint import StageParams, StageWriter
from qtool.core.errors import QtoolError
from qtool.core.progress import console
from qtool.models.adapters import adapter_for
from qtool.quant.rptq import (
    ROPE_FREE,
    check_stats,
    fold_block,
    permute_stats,
    plan_block,
)
from qtool.runtime.gathers import install_gathers
from qtool.runtime.loader import load, open_source
from qtool.stages.base import fingerprint_or_skip


@dataclass(frozen=True)
class ReorderParams(StageParams):
    clusters: int = 32  # per norm output (R1, R4) and MLP middle (R5)
    head_clusters: int = 4  # per KV head, for K (R2) and V (R3)
    seed: int = 0


@torch.no_grad()
def reorder_model(model, adapter, stats, clusters: int, head_clusters: int, seed: int = 0) -> tuple[dict, dict]:
    """Reorder `model` in place (weights folded, norm gathers installed); returns (stage tensors,
    permuted statistics)."""
    if clusters < 1 or head_clusters < 1:
        raise QtoolError(
            f"cluster counts must be at least 1, got --clusters {clusters} --head-clusters {head_clusters}"
        )
    check_stats(stats, model, adapter)
    tensors = {}
    for i, block in enumerate(adapter.layers(model)):
        plan = plan_block(stats, adapter, model.config, i, clusters, head_clusters, seed)
        fold_block(block, adapter, model.config, {site: perm for site, (perm, _) in plan.items()})
        for site, (perm, bounds) in plan.items():
            tensors[f"layers.{i}.{site}.perm"] = perm
            tensors[f"layers.{i}.{site}.inverse"] = torch.argsort(perm)
            tensors[f"layers.{i}.{site}.bounds"] = bounds
    install_gathers(model, adapter, tensors)
    return tensors, permute_stats(stats, tensors, adapter, model.config, len(adapter.layers(model)))


def reorder(params: ReorderParams, device: str = "auto") -> dict:
    """Run the stage (or find it already complete) and return its summary. Reordering is cheap
    CPU work (KMeans on per-channel ranges, index copies), so `device` is not used."""
    source = open_source(params.model)
    source.require("calibrate", "reorder")
    if "reorder" in source.stages:
        raise QtoolError(f"{source.path} is already reordered; reorder its calibrate stage instead")
    out = Path(params.out)
    fingerprint, skipped = fingerprint_or_skip("reorder", params, source)
    if skipped:
        return skipped
    t0 = time.time()
    model, tokenizer = load(source)
    adapter = adapter_for(model.config)
    tensors, stats = reorder_model(
        model, adapter, source.tensors("calibrate"), params.clusters, params.head_clusters, params.seed
    )
    with StageWriter(out, "reorder", params.fingerprint_params(), source) as writer:
        writer.save_model(model, tokenizer)
        writer.save_tensors("reorder", tensors)
        writer.save_tensors("calibrate", stats)
        writer.timings["reorder_s"] = round(time.time() - t0, 3)
        writer.metrics.update(
            clusters=params.clusters,
            head_clusters=params.head_clusters,
            k_identity_for_rope=adapter.family not in ROPE_FREE,
        )
        writer.commit()
    blocks = len(adapter.layers(model))
    console.print(
        f"reorder: {blocks} blocks, {params.clusters} clusters per site, {params.head_clusters} per KV head -> {out}"
    )
    return {
        "stage": "reorder",
        "out": str(out),
        "skipped": False,
        "blocks": blocks,
        "seconds": round(time.time() - t0, 2),
    }
