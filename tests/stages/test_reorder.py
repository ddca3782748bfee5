"""RPTQ reorder: exact folds on every family, contiguous clusters, cluster quantization, bad input."""

import pytest
import torch

from conftest import FAMILIES, tiny_model
from qtool.core.checkpoint import layer_key, open_stage
from qtool.core.errors import QtoolError
from qtool.core.quantizer import fake_quant, minmax_qparams
from qtool.core.spec import parse_spec
from qtool.models.adapters import adapter_for
from qtool.quant.fakequant import ActQuantizer, apply_spec
from qtool.quant.rptq import cluster_bounds, cluster_order, plan_block
from qtool.runtime.loader import load, open_source
from qtool.stages.calibrate import CalibrateParams, calibrate
from qtool.stages.eval import EvalParams, evaluate
from qtool.stages.reorder import ReorderParams, reorder, reorder_model


def _stats(model, ids):
    """Per-channel min/max/absmax of every linear input and q/k/v output, from one forward."""
    adapter = adapter_for(model.config)
    seen, handles = {}, []
    for i, block in enumerate(adapter.layers(model)):
        for name, lin in adapter.linears(block).items():
            handles.append(
                lin.register_forward_pre_hook(lambda m, a, k=layer_key(i, name, "input"): seen.__setitem__(k, a[0]))
            )
            if name in (adapter.q, adapter.k, adapter.v):
                handles.append(
                    lin.register_forward_hook(lambda m, a, o, k=layer_key(i, name, "output"): seen.__setitem__(k, o))
                )
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    stats = {}
    for key, x in seen.items():
        flat = x.reshape(-1, x.shape[-1]).float()
        stats.update({f"{key}.min": flat.amin(0), f"{key}.max": flat.amax(0), f"{key}.absmax": flat.abs().amax(0)})
    return stats


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_reorder_preserves_logits_in_float64(family):
    model = tiny_model(family).double()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    before = _logits(model, ids)
    tensors, _ = reorder_model(model, adapter_for(model.config), _stats(model, ids), clusters=8, head_clusters=4)
    # the folds really moved channels: no site of block 0 but K on RoPE models is the identity
    moved = {
        s
        for s in ("attn_in", "q_k", "v_o", "mlp_in", "mlp_mid")
        if not torch.equal(tensors[f"layers.0.{s}.perm"], torch.arange(tensors[f"layers.0.{s}.perm"].numel()))
    }
    assert moved == ({"attn_in", "v_o", "mlp_in", "mlp_mid"} | ({"q_k"} if family == "opt" else set()))
    after = _logits(model, ids)
    assert ((after - before).norm() / before.norm()).item() < 1e-6


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
    stats = _stats(model, torch.randint(0, 256, (2, 24)))
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


def test_one_cluster_static_equals_per_tensor_static():
    torch.manual_seed(0)
    x, lo, hi = torch.randn(3, 5, 40), -torch.rand(40) * 3, torch.rand(40) * 2
    scale, zero = minmax_qparams(lo.min(), hi.max(), 16, sym=False)
    expected = fake_quant(x, scale, zero, 16)
    assert torch.equal(ActQuantizer(4, torch.tensor([0, 40]), (lo, hi))(x), expected)
    # two clusters: each segment uses its own range
    two = ActQuantizer(4, torch.tensor([0, 10, 40]), (lo, hi))(x)
    s2, z2 = minmax_qparams(lo[10:].min(), hi[10:].max(), 16, sym=False)
    assert torch.equal(two[..., 10:], fake_quant(x[..., 10:], s2, z2, 16))


def test_cluster_dynamic_is_per_token_per_cluster():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12)
    out = ActQuantizer(3, torch.tensor([0, 4, 12]))(x)
    for a, b in ((0, 4), (4, 12)):
        seg = x[..., a:b]
        s, z = minmax_qparams(seg.amin(-1, keepdim=True), seg.amax(-1, keepdim=True), 8, sym=False)
        assert torch.equal(out[..., a:b], fake_quant(seg, s, z, 8))


def test_cluster_spec_needs_a_reorder_stage():
    model = tiny_model("llama")
    with pytest.raises(QtoolError, match="qtool reorder"):
        apply_spec(model, adapter_for(model.config), parse_spec("W4A16KV4-cluster"), {})
    assert parse_spec("W4A16KV4-cluster").name == "W4A16KV4-cluster"


@pytest.fixture
def reorder_stage(tiny_dir, tmp_path):
    cal = tmp_path / "cal"
    calibrate(CalibrateParams(str(tiny_dir), str(cal), samples=2, seqlen=32), device="cpu")
    out = tmp_path / "ro"
    reorder(ReorderParams(str(cal), str(out), clusters=8, head_clusters=2))
    return cal, out


def test_reorder_stage_round_trip(reorder_stage):
    cal, out = reorder_stage
    stage = open_stage(out)
    assert stage.stages == ["calibrate", "reorder"] and stage.has_tensors("reorder")
    tensors = stage.tensors("reorder")
    perm = tensors["layers.0.mlp_in.perm"]
    assert torch.equal(perm[tensors["layers.0.mlp_in.inverse"]], torch.arange(perm.numel()))
    old, new = open_stage(cal).tensors("calibrate"), stage.tensors("calibrate")
    assert torch.equal(new["layers.0.mlp.up_proj.input.max"], old["layers.0.mlp.up_proj.input.max"][perm])
    ids = torch.randint(0, 256, (1, 20))
    (m0, _), (m1, _) = load(open_source(str(cal))), load(open_source(str(out)))  # gathers re-installed
    a, b = _logits(m0, ids), _logits(m1, ids)
    assert ((a - b).norm() / a.norm()).item() < 1e-5
    bounds = cluster_bounds(tensors, adapter_for(m1.config), m1.config)
    assert bounds["layers.2.self_attn.o_proj.input"][-1] == 64
    for spec in ("W4A4KV4-cluster", "W4A16KV4-cluster", "W4A8-cluster-dynamic"):
        result = evaluate(EvalParams(str(out), spec=spec, seqlen=32, windows=1), device="cpu")
        assert result.spec == spec and result.ppl > 1


def test_bad_inputs_are_one_line_errors(reorder_stage, tmp_path):
    cal, out = reorder_stage
    with pytest.raises(QtoolError, match="already reordered"):
        reorder(ReorderParams(str(out), str(tmp_path / "again")))
    with pytest.raises(QtoolError, match="more than the 64 channels"):
        reorder(ReorderParams(str(cal), str(tmp_path / "x"), clusters=65))
    with pytest.raises(QtoolError, match="head dimension 16"):
        reorder(ReorderParams(str(cal), str(tmp_path / "x"), head_clusters=17))
    model = tiny_model("llama")
    adapter = adapter_for(model.config)
    stats = _stats(model, torch.randint(0, 256, (1, 8)))
    fewer = {k: v for k, v in stats.items() if not k.startswith("layers.2.")}
    with pytest.raises(QtoolError, match="lack layers.2"):
        reorder_model(model, adapter, fewer, 4, 2)
    more = {**stats, "layers.3.mlp.up_proj.input.max": torch.zeros(64)}
    with pytest.raises(QtoolError, match="more than 3 blocks"):
        reorder_model(model, adapter, more, 4, 2)
    wide = {**stats, "layers.1.mlp.down_proj.input.max": torch.zeros(128)}
    with pytest.raises(QtoolError, match="has 128 channels but the model has 96"):
        reorder_model(model, adapter, wide, 4, 2)
    with pytest.raises(QtoolError, match="needs a 'calibrate' stage"):
        reorder(ReorderParams(open_stage(cal).manifest["parent"]["path"], str(tmp_path / "y")))


def test_reorder_preserves_smollm2_logits(smollm2_dir):
    """The real model in float32: the reordered model's logits match to float32 accuracy."""
    model, _ = load(open_source(str(smollm2_dir)))
    ids = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(3))
    before = _logits(model, ids)
    reorder_model(model, adapter_for(model.config), _stats(model, ids), clusters=8, head_clusters=2)
    after = _logits(model, ids)
    assert ((after - before).norm() / before.norm()).item() < 1e-5


def test_memory_from_config_alone():
    from pathlib import Path

    from qtool.metrics.memory import config_memory

    config = Path(__file__).resolve().parents[2] / "configs/llama-2-70b.json"
    rows = {
        r["spec"]: r for r in config_memory(str(config), ["W16A16", "W4A16", "W4A16KV4", "W4A16KV4-cluster"], 64, 8192)
    }
    kv16 = 2 * 80 * 64 * 8192 * 8 * 128 * 2  # K and V, layers, batch, tokens, KV heads, head dim, bytes
    assert rows["W16A16"]["kv_bytes"] == rows["W4A16"]["kv_bytes"] == kv16
    assert rows["W4A16KV4-cluster"]["kv_bytes"] == kv16 // 4  # static cluster scales are per layer
    assert rows["W4A16KV4"]["kv_bytes"] == kv16 // 4 + kv16 // 2 // 128 * 4  # fp16 scale and zero per token and head
    assert 4 < rows["W4A16"]["weight_bits_per_param"] < 4.1 and rows["W4A16"]["linear_params"] > 6.4e10
