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

from dataclasses import dataclass

import torch

from qtool.core.checkpoint import StageDir, layer_key
from qtool.core.errors import QtoolError
from qtool.quant.rptq import ROPE_FREE, check_stats, fold_block, permute_stats, plan_block
from qtool.runtime.gathers import install_gathers
from qtool.stages.base import Run, Stage, StageParams, StageResult, param


@dataclass(frozen=True)
class ReorderParams(StageParams):
    clusters: int = param(32, "Channel clusters per norm output (R1, R4) and MLP middle (R5).", min=1)
    head_clusters: int = param(4, "Channel clusters per KV head, for K (R2) and V (R3).", min=1)
    seed: int = param(0, "KMeans seed.")


@dataclass(kw_only=True)
class ReorderResult(StageResult):
    blocks: int
    clusters: int
    head_clusters: int

    def summary(self) -> str:
        return (
            f"reorder: {self.blocks} blocks, {self.clusters} clusters per site, "
            f"{self.head_clusters} per KV head -> {self.out}"
        )


@torch.no_grad()
def reorder_model(model, adapter, stats, clusters: int, head_clusters: int, seed: int = 0) -> tuple[dict, dict]:
    """Reorder `model` in place (weights folded, norm gathers installed); returns (stage tensors,
    permuted statistics)."""
    check_stats(stats, model, adapter)
    tensors = {}
    for i, block in enumerate(adapter.layers(model)):
        plan = plan_block(stats, adapter, model.config, i, clusters, head_clusters, seed)
        fold_block(block, adapter, model.config, {site: perm for site, (perm, _) in plan.items()})
        for site, (perm, bounds) in plan.items():
            tensors[layer_key(i, site, "perm")] = perm
            tensors[layer_key(i, site, "inverse")] = torch.argsort(perm)
            tensors[layer_key(i, site, "bounds")] = bounds
    install_gathers(model, adapter, tensors)
    return tensors, permute_stats(stats, tensors, adapter, model.config, len(adapter.layers(model)))


class Reorder(Stage):
    """Reordering is cheap CPU work (KMeans on per-channel ranges, index copies): no device."""

    name = "reorder"
    params = ReorderParams
    help = "RPTQ: cluster channels by calibration range, fold the reordering into the weights."
    model_help = "A calibrate stage directory."

    def check(self, params: ReorderParams, source: StageDir) -> None:
        source.require("calibrate", "reorder")
        if "reorder" in source.stages:
            raise QtoolError(f"{source.path} is already reordered; reorder its calibrate stage instead")

    def work(self, run: Run) -> ReorderResult:
        p = run.params
        model, tokenizer, adapter = run.load()
        tensors, stats = reorder_model(
            model, adapter, run.source.tensors("calibrate"), p.clusters, p.head_clusters, p.seed
        )
        with run.writer() as writer:
            writer.save_model(model, tokenizer)
            writer.save_tensors("reorder", tensors)
            writer.save_tensors("calibrate", stats)
            run.commit(
                writer,
                clusters=p.clusters,
                head_clusters=p.head_clusters,
                k_identity_for_rope=adapter.family not in ROPE_FREE,
            )
        blocks = len(adapter.layers(model))
        return ReorderResult(
            stage=self.name,
            out=str(run.out),
            blocks=blocks,
            clusters=p.clusters,
            head_clusters=p.head_clusters,
            seconds=run.seconds(),
        )


reorder = Reorder()
