"""The Decoder (static cache, fused q|k|v and gate|up, compiled small ops) computes what the
transformers forward computes: float64 logits position by position, packed models, generate()."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from qtool.core.errors import QtoolError
from qtool.models.adapters import adapter_for
from qtool.runtime.decoder import Decoder
from qtool.runtime.packed_linear import PackedLinear
from qtool.runtime.packed_model import load_packed
from qtool.stages.pack import PackParams, pack


def _stepwise(decoder, ids, prompt):
    """Logits after each position from `prompt`-1 on: one prefill, then one token per step."""
    out = [decoder.forward(ids[:, :prompt], 0)]
    out += [decoder.forward(ids[:, p : p + 1], p) for p in range(prompt, ids.shape[1])]
    return torch.stack(out, 1)


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_decoder_matches_transformers_in_float64(family):
    model = tiny_model(family).double()
    if family == "qwen2":  # give the fused q|k|v a real bias
        for block in model.model.layers:
            torch.nn.init.normal_(block.self_attn.k_proj.bias)
    ids = torch.randint(0, 256, (2, 14), generator=torch.Generator().manual_seed(0))
    ref = _hf_logits(model, ids)
    decoder = Decoder(model, batch=2, max_len=16)
    assert all(b.qkv is not None and b.gate_up is not None for b in decoder.blocks)
    torch.testing.assert_close(_stepwise(decoder, ids, 5), ref[:, 4:], rtol=0, atol=1e-12)
    # the model's own forward still works on the shared (viewed) weights
    torch.testing.assert_close(_hf_logits(model, ids), ref, rtol=0, atol=0)


def test_decoder_generate_equals_transformers_greedy():
    import qtool

    model = tiny_model("llama").double()
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(qtool.Decoder(model, batch=2, max_len=14).generate(ids, 8), want)


@pytest.mark.parametrize("spec,fused", [("W4A16-g32", True), ("W4A8-g32", True), ("W4A4KV4", False), ("W6A8", False)])
def test_decoder_runs_packed_models_like_their_forward(tiny_dir, tmp_path, spec, fused):
    """Packed linears (weight-only with and without quantized activations; KV-quantized K/V outputs,
    which cannot fuse; bit-planes, which do not) give the transformers forward's logits."""
    pack(PackParams(str(tiny_dir), str(tmp_path / "p"), spec=spec))
    model = load_packed(tmp_path / "p", dtype=torch.float64)
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(2))
    ref = _hf_logits(model, ids)
    decoder = Decoder(model, batch=1, max_len=12)
    assert all((b.qkv is not None) == fused for b in decoder.blocks)
    if fused:
        assert isinstance(decoder.blocks[0].qkv, PackedLinear) and decoder.blocks[0].qkv.out_features == 64 + 2 * 32
    torch.testing.assert_close(_stepwise(decoder, ids, 4), ref[:, 3:], rtol=0, atol=1e-10)
    torch.testing.assert_close(_hf_logits(model, ids), ref, rtol=0, atol=0)


def test_decoder_refuses_what_it_does_not_implement():
    with pytest.raises(QtoolError, match="opt"):
        Decoder(tiny_model("opt"), batch=1, max_len=8)
    with pytest.raises(QtoolError, match="sliding window"):
        Decoder(tiny_model("mistral"), batch=1, max_len=32)
    decoder = Decoder(tiny_model("llama"), batch=2, max_len=8)
    with pytest.raises(QtoolError, match="batch 2"):
        decoder.generate(torch.zeros(1, 4, dtype=torch.long), 2)
    with pytest.raises(QtoolError, match="max_len 8"):
        decoder.generate(torch.zeros(2, 4, dtype=torch.long), 5)


def test_decoder_keeps_hooked_linears_separate():
    """A linear with hooks (a fake-quantized stage's activation quantizer) is called as a module."""
    from qtool.core.spec import parse_spec
    from qtool.quant.fakequant import apply_spec

    model = tiny_model("llama").double()
    apply_spec(model, adapter_for(model.config), parse_spec("W4A8KV4"))
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(3))
    ref = _hf_logits(model, ids)
    decoder = Decoder(model, batch=1, max_len=10)
    assert all(b.qkv is None and b.gate_up is None for b in decoder.blocks)
    torch.testing.assert_close(_stepwise(decoder, ids, 3), ref[:, 2:], rtol=0, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("spec", [None, "W4A16-g32", "W2A8", "W4A8KV8"])
def test_decoder_on_the_gpu_matches_the_transformers_forward(tiny_dir, tmp_path, spec):
    """fp16 on the GPU (compiled small ops, kernels) against the same model's transformers forward
    on the GPU, and the CUDA-graph step that generate() replays against the eager step. (8-bit
    codes: at 4 bits, 16-bit rounding differences between compiled and eager code flip activation
    codes by whole steps on this random model, 7% of the logits for W4A4KV4; the CPU tests above
    check the arithmetic exactly.)"""
    if spec is None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float16).cuda().eval()
    else:
        pack(PackParams(str(tiny_dir), str(tmp_path / "p"), spec=spec))
        model = load_packed(tmp_path / "p", dtype=torch.float16, device="cuda")
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(4)).cuda()
    ref = _hf_logits(model, ids)[:, 5:].double()
    decoder = Decoder(model, batch=2, max_len=24)
    # per-channel W2A8: every block's decode step runs fused (norms, quantization, residuals in the GEMVs)
    assert all(b.fusable for b in decoder.blocks) == (spec == "W2A8")
    got = _stepwise(decoder, ids, 6).double()
    err = ((got - ref).norm() / ref.norm()).item()
    assert err < (1e-2 if spec is None or "A16" in spec else 5e-2), err
    graph, g_ids, g_start, logits = decoder.step_graph()
    g_ids.copy_(ids[:, 15:16])
    g_start.fill_(15)
    graph.replay()
    eager = decoder.forward(ids[:, 15:16], 15).double()
    err = ((logits.double() - eager).norm() / eager.norm()).item()
    assert err < 1e-3, err
    # generate (graph replays, after a prefill) against the same greedy loop stepped eagerly: equal
    # tokens unless the graph's warm-up runs left anything in the cache
    tokens = decoder.generate(ids[:, :6], 8)
    again = [ids[:, :6], decoder.forward(ids[:, :6], 0).argmax(-1, keepdim=True)]
    for p in range(6, 13):
        again.append(decoder.forward(again[-1], p).argmax(-1, keepdim=True))
    assert torch.equal(tokens, torch.cat(again, 1))


def test_decoder_runs_an_rptq_packed_model(tiny_dir, tmp_path):
    """Reordered norms (gather fused into the compiled norm) and cluster-wise activation and KV ranges."""
    from qtool.stages.calibrate import CalibrateParams, calibrate
    from qtool.stages.reorder import ReorderParams, reorder

    cal, ro = tmp_path / "cal", tmp_path / "ro"
    calibrate(CalibrateParams(str(tiny_dir), str(cal), samples=2, seqlen=32), device="cpu")
    reorder(ReorderParams(str(cal), str(ro), clusters=4, head_clusters=2))
    for spec in ("W4A8-cluster-dynamic", "W4A4KV4-cluster-dynamic"):
        pack(PackParams(str(ro), str(tmp_path / spec), spec=spec))
        model = load_packed(tmp_path / spec, dtype=torch.float64)
        ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(5))
        ref = _hf_logits(model, ids)
        decoder = Decoder(model, batch=1, max_len=12)
        assert all(b.attn_norm.perm is not None and b.attn_norm.fast for b in decoder.blocks)
        torch.testing.assert_close(_stepwise(decoder, ids, 4), ref[:, 3:], rtol=0, atol=1e-10)
