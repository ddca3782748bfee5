"""RPTQ channel reordering: cluster channels by their calibration ranges, make each cluster
contiguous, and fold the permutation into the weights so nothing is reordered at run time.

Five sites per block (names follow `Adapter.fold_pairs`, plus `q_k`):

* `attn_in` (R1) and `mlp_in` (R4): a norm's output. The residual stream is never permuted: the
  norm keeps its input order and writes its output reordered. This is RPTQ's "reorder fused into
  the LayerNorm kernel"; in PyTorch it is a gather on the norm's input (`NormGather`), exact
  because normalisation commutes with a channel permutation: norm(x[p]) with weight w[p] equals
  (norm(x) * w)[p]. The consumers' input columns are permuted to match.
* `q_k` (R2): key (and query) output channels, permuted within each KV head (every query head of
  the group takes its KV head's permutation), so q.k is unchanged. Only for models without
  rotary embeddings (OPT): RoPE rotates channel pair (i, i + d/2) by a frequency fixed to the
  position i, so any non-identity permutation of a head's channels changes q.k. On RoPE families
  this site is the identity and K is clustered per head.
* `v_o` (R3): value output channels within each KV head; o's input columns of every query head of
  the group follow.
* `mlp_mid` (R5): up (and gate) or fc1 output rows, down / fc2 input columns. The elementwise
  activation passes a permutation through.

R2, R3 and R5 are pure weight folds. Stage tensors per block and site: `perm` (new channel c holds
old channel perm[c]), `inverse`, and `bounds` (offsets of the contiguous clusters, 0 .. width).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from qtool.core.checkpoint import layer_key
from qtool.core.errors import QtoolError
from qtool.models.adapters import Adapter

ROPE_FREE = ("opt",)
STATS = ("min", "max", "absmax")


def cluster_order(features: torch.Tensor, n_clusters: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """KMeans on per-channel features [C, F] -> (perm, sizes): channels grouped by cluster,
    clusters ordered by centroid (lexicographic), channels in their old order inside a cluster."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    n = features.shape[0]
    if n_clusters == 1:
        return torch.arange(n), torch.tensor([n])
    # One thread: these problems are tiny, and OpenMP threads only fight over them.
    with threadpool_limits(1):
        km = KMeans(n_clusters=n_clusters, n_init=3, random_state=seed).fit(features.double().numpy())
    rank = np.empty(n_clusters, dtype=np.int64)
    rank[np.lexsort(km.cluster_centers_.T[::-1])] = np.arange(n_clusters)
    key = rank[km.labels_]
    perm = torch.from_numpy(np.argsort(key, kind="stable"))
    sizes = torch.from_numpy(np.bincount(key, minlength=n_clusters))
    return perm, sizes[sizes > 0]


def _bounds(sizes: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([torch.zeros(1, dtype=torch.long), torch.cat(sizes).cumsum(0)])


def head_order(features: torch.Tensor, heads: int, n_clusters: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster channels within each head independently: features [heads * d, F] -> (perm, bounds)."""
    d = features.shape[0] // heads
    perms, sizes = [], []
    for h in range(heads):
        p, s = cluster_order(features[h * d : (h + 1) * d], n_clusters, seed)
        perms.append(p + h * d)
        sizes.append(s)
    return torch.cat(perms), _bounds(sizes)


def expand_heads(perm: torch.Tensor, kv: int, heads: int) -> torch.Tensor:
    """A within-head permutation of kv heads -> the same for every query head of each group."""
    d = perm.numel() // kv
    rep = heads // kv
    local = perm.reshape(kv, d) - torch.arange(kv)[:, None] * d
    return (local.repeat_interleave(rep, 0) + torch.arange(heads)[:, None] * d).reshape(-1)


def expand_head_bounds(bounds: torch.Tensor, kv: int, heads: int, d: int) -> torch.Tensor:
    """Cluster bounds of kv heads -> bounds of the query heads that read them (GQA)."""
    rep = heads // kv
    sizes = torch.diff(bounds)
    per_head = [sizes[(bounds[:-1] >= g * d) & (bounds[:-1] < (g + 1) * d)] for g in range(kv)]
    return _bounds([per_head[h // rep] for h in range(heads)])


def _features(stats: Mapping[str, torch.Tensor], prefix: str) -> torch.Tensor:
    return torch.stack([stats[f"{prefix}.max"], stats[f"{prefix}.min"]], dim=1).double()


def check_stats(stats: Mapping[str, torch.Tensor], model: nn.Module, adapter: Adapter) -> None:
    """Fail in one line unless `stats` are calibration statistics of exactly this model."""
    blocks = adapter.layers(model)
    if any(k.startswith(f"layers.{len(blocks)}.") for k in stats):
        raise QtoolError(
            f"the calibration statistics are of a model with more than {len(blocks)} blocks; calibrate this model"
        )
    for i, block in enumerate(blocks):
        for name, linear in adapter.linears(block).items():
            wheres = [("input", linear.in_features)]
            if name in (adapter.q, adapter.k, adapter.v):
                wheres.append(("output", linear.out_features))
            for where, width in wheres:
                key = f"{layer_key(i, name, where)}.max"
                if key not in stats:
                    raise QtoolError(
                        f"the calibration statistics lack {key}: they are of another model; calibrate this model"
                    )
                if stats[key].numel() != width:
                    raise QtoolError(
                        f"{key} has {stats[key].numel()} channels but the model has {width}: "
                        "statistics of another model; calibrate this model"
                    )


def plan_block(
    stats, adapter: Adapter, config, index: int, clusters: int, head_clusters: int, seed: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(perm, bounds) of every site of block `index` from its calibration statistics."""
    heads, kv, d = adapter.attention_shape(config)
    pre = lambda name, where: layer_key(index, name, where)  # noqa: E731
    pairs = {p.name: p for p in adapter.fold_pairs(config)}
    plan = {}
    for site in ("attn_in", "mlp_in", "mlp_mid"):
        feats = _features(stats, pre(pairs[site].consumers[0], "input"))
        if clusters > feats.shape[0]:
            raise QtoolError(
                f"--clusters {clusters} is more than the {feats.shape[0]} channels of {site}; "
                f"use at most {feats.shape[0]}"
            )
        perm, sizes = cluster_order(feats, clusters, seed)
        plan[site] = perm, _bounds([sizes])
    if head_clusters > d:
        raise QtoolError(f"--head-clusters {head_clusters} is more than the head dimension {d}; use at most {d}")
    # v_o: value channels and the o-input channels of every query head reading them.
    v = _features(stats, pre(adapter.v, "output")).reshape(kv, d, 2)
    o = _features(stats, pre(adapter.o, "input")).reshape(kv, heads // kv, d, 2).permute(0, 2, 1, 3).reshape(kv, d, -1)
    plan["v_o"] = head_order(torch.cat([v, o], -1).reshape(kv * d, -1), kv, head_clusters, seed)
    if adapter.family in ROPE_FREE:
        plan["q_k"] = head_order(_features(stats, pre(adapter.k, "output")), kv, head_clusters, seed)
    else:
        plan["q_k"] = torch.arange(kv * d), torch.arange(kv + 1) * d
    return plan


# -- folding -------------------------------------------------------------------------------------


def _rows(module: nn.Module, perm: torch.Tensor) -> None:
    module.weight.copy_(module.weight[perm])
    if getattr(module, "bias", None) is not None:
        module.bias.copy_(module.bias[perm])


def _cols(linear: nn.Linear, perm: torch.Tensor) -> None:
    linear.weight.copy_(linear.weight[:, perm])


@torch.no_grad()
def fold_block(block: nn.Module, adapter: Adapter, config, plan: Mapping[str, torch.Tensor]) -> None:
    """Fold each site's permutation (plan: site -> perm) into the block's weights. The norms'
    weights are permuted too; `install_gathers` supplies their output order at run time."""
    heads, kv, _ = adapter.attention_shape(config)
    get = block.get_submodule
    for pair in adapter.fold_pairs(config):
        perm = plan[pair.name]
        producers = [pair.producer] + ([adapter.mlp_in[0]] if pair.through_act == "gate" else [])
        for name in producers:
            _rows(get(name), perm)
        wide = expand_heads(perm, kv, heads) if pair.name == "v_o" else perm
        for name in pair.consumers:
            _cols(get(name), wide)
    _rows(get(adapter.k), plan["q_k"])
    _rows(get(adapter.q), expand_heads(plan["q_k"], kv, heads))


# -- what follows each permutation: statistics and quantization clusters ------------------------


def site_tensors(adapter: Adapter, config, index: int) -> dict[str, tuple[str, bool]]:
    """Stat prefix of every tensor whose channels a site orders -> (site, widened to query heads)."""
    pre = lambda name, where: layer_key(index, name, where)  # noqa: E731
    out = {pre(n, "input"): ("attn_in", False) for n in (adapter.q, adapter.k, adapter.v)}
    out.update({pre(n, "input"): ("mlp_in", False) for n in adapter.mlp_in})
    out[pre(adapter.mlp_out, "input")] = ("mlp_mid", False)
    out[pre(adapter.v, "output")] = ("v_o", False)
    out[pre(adapter.o, "input")] = ("v_o", True)
    out[pre(adapter.k, "output")] = ("q_k", False)
    out[pre(adapter.q, "output")] = ("q_k", True)
    return out


def permute_stats(
    stats: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor], adapter: Adapter, config, blocks: int
) -> dict[str, torch.Tensor]:
    """Calibration statistics in the reordered channel order."""
    heads, kv, _ = adapter.attention_shape(config)
    out = dict(stats)
    for i in range(blocks):
        for prefix, (site, wide) in site_tensors(adapter, config, i).items():
            perm = tensors[layer_key(i, site, "perm")]
            perm = expand_heads(perm, kv, heads) if wide else perm
            for what in STATS:
                out[f"{prefix}.{what}"] = stats[f"{prefix}.{what}"][perm]
    return out


def cluster_bounds(tensors: Mapping[str, torch.Tensor], adapter: Adapter, config) -> dict[str, torch.Tensor]:
    """The cluster description `apply_spec` takes: stat prefix -> cluster bounds of that tensor."""
    heads, kv, d = adapter.attention_shape(config)
    blocks = config.num_hidden_layers
    out = {}
    for i in range(blocks):
        for prefix, (site, wide) in site_tensors(adapter, config, i).items():
            bounds = tensors[layer_key(i, site, "bounds")]
            out[prefix] = expand_head_bounds(bounds, kv, heads, d) if wide else bounds
    return out
