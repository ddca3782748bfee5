"""RPTQ maths: contiguous KMeans clusters at every site, and why RoPE models keep their q/k channels."""

import torch

from conftest import forward_stats, tiny_model
from qtool.models.adapters import adapter_for
from qtool.quant.rptq import cluster_order, plan_block


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_rope_forbids_permuting_qk_channels():
    """Why R2 is the identity on RoPE models: a pair-preserving permutation of q/k channels (the
    same for both halves of each head) still changes the logits, because each pair's rotation
    frequency is fixed by its position."""
    model = tiny_model("llama").double()
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    before = _logits(model, ids)
    heads, kv, d = adapter_for(model.config).attention_shape(model.config)
    pairs = torch.randperm(d // 2, generator=torch.Generator().manual_seed(0))
    within = torch.cat([pairs, pairs + d // 2])
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        for proj, n in ((attn.q_proj, heads), (attn.k_proj, kv)):
            proj.weight.copy_(proj.weight[(within + torch.arange(n)[:, None] * d).reshape(-1)])
    assert ((_logits(model, ids) - before).norm() / before.norm()).item() > 1e-3


def test_clusters_are_contiguous_and_ordered():
    torch.manual_seed(0)
    feats = torch.cat([torch.randn(20, 2) + 10, torch.randn(30, 2), torch.randn(14, 2) - 10])[torch.randperm(64)]
    perm, sizes = cluster_order(feats, 3, seed=0)
    assert sorted(perm.tolist()) == list(range(64)) and sizes.tolist() == [14, 30, 20]
    chunks = feats[perm].split(sizes.tolist())
    assert all((c.mean(0) - target).abs().max() < 1.5 for c, target in zip(chunks, (-10, 0, 10)))


def test_every_site_makes_kmeans_clusters_contiguous():
    from sklearn.cluster import KMeans

    model = tiny_model("opt").double()
    adapter = adapter_for(model.config)
    stats = forward_stats(model, torch.randint(0, 256, (2, 24)))
    plan = plan_block(stats, adapter, model.config, 1, clusters=6, head_clusters=3, seed=0)
    for site, key in (("attn_in", "self_attn.q_proj.input"), ("mlp_in", "fc1.input"), ("mlp_mid", "fc2.input")):
        perm, bounds = plan[site]
        x = torch.stack([stats[f"layers.1.{key}.max"], stats[f"layers.1.{key}.min"]], 1).double().numpy()
        labels = torch.from_numpy(KMeans(6, n_init=3, random_state=0).fit(x).labels_)[perm]
        for a, b in zip(bounds[:-1], bounds[1:]):
            assert len(set(labels[a:b].tolist())) == 1, site  # one cluster per segment
        assert len(set(labels.tolist())) == bounds.numel() - 1
    for site in ("q_k", "v_o"):  # within-head permutations, clusters never cross a head
        perm, bounds = plan[site]
        d = perm.numel() // 4
        assert torch.equal(perm // d, torch.arange(perm.numel()) // d)
        assert set(range(0, perm.numel() + 1, d)) <= set(bounds.tolist())
