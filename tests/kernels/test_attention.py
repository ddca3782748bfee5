"""Decode attention: the torch reference against transformers' rotary + SDPA in float64 (CPU), and the
CUDA kernel against the reference computed in float64 on the same fp16/bf16 inputs (GPU): output,
cache writes, split-K combination at chunk boundaries, grouped heads, and CUDA-graph replay."""

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from qtool.kernels import attention
from qtool.kernels.cuda_runtime import cupy_available

needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and cupy_available()), reason="no CUDA GPU or cupy")


def _inputs(b, heads, kv_heads, d, length, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, (heads + 2 * kv_heads) * d, generator=gen)
    angle = torch.rand(d // 2, generator=gen) * 6.28
    cos, sin = torch.cat([angle.cos()] * 2), torch.cat([angle.sin()] * 2)
    caches = torch.randn(2, b, kv_heads, length, d, generator=gen)
    return [t.to(device=device, dtype=dtype) for t in (qkv, cos, sin, caches[0], caches[1])]


def test_reference_matches_transformers_rotary_and_sdpa():
    b, heads, kv_heads, d, length, p = 2, 6, 2, 16, 11, 7
    qkv, cos, sin, kc, vc = _inputs(b, heads, kv_heads, d, length, torch.float64, "cpu")
    kc0, vc0 = kc.clone(), vc.clone()
    out = attention.decode_attention_ref(qkv, cos, sin, kc, vc, torch.tensor([p]), heads, 0.3, compute=torch.float64)

    q, k, v = qkv.view(b, 1, heads + 2 * kv_heads, d).transpose(1, 2).split([heads, kv_heads, kv_heads], dim=1)
    q, k = apply_rotary_pos_emb(q, k, cos.view(1, 1, d), sin.view(1, 1, d))
    keys, values = torch.cat([kc0[:, :, :p], k], 2), torch.cat([vc0[:, :, :p], v], 2)
    expect = torch.nn.functional.scaled_dot_product_attention(q, keys, values, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(out, expect.transpose(1, 2).reshape(b, heads * d), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kc[:, :, p], k[:, :, 0])
    torch.testing.assert_close(vc[:, :, p], v[:, :, 0])
    torch.testing.assert_close(kc[:, :, p + 1 :], kc0[:, :, p + 1 :], rtol=0, atol=0)  # nothing else written


def test_workspace_splits_cover_the_cache():
    for length in (1, 31, 33, 513, 4096, 10000):
        ws = attention.workspace(1, 32, 8, 128, length, "cpu")
        assert ws.chunk <= attention.max_chunk(128) and ws.chunk * ws.splits >= length > ws.chunk * (ws.splits - 1)


SHAPES = [(1, 32, 32, 128), (1, 9, 3, 64), (3, 64, 8, 128), (2, 28, 4, 128), (1, 4, 2, 256), (2, 5, 5, 64)]


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("length", [1, 40, 513, 2049])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("where", ["first", "chunk_end", "chunk_start", "last"])
def test_kernel_matches_reference(shape, length, dtype, where):
    b, heads, kv_heads, d = shape
    ws = attention.workspace(b, heads, kv_heads, d, length, "cuda")
    p = {
        "first": 0,
        "chunk_end": min(ws.chunk - 1, length - 1),
        "chunk_start": min(ws.chunk, length - 1),
        "last": length - 1,
    }[where]
    qkv, cos, sin, kc, vc = _inputs(b, heads, kv_heads, d, length, dtype, "cuda", seed=length + p)
    rk, rv = kc.clone(), vc.clone()
    expect = attention.decode_attention_ref(
        qkv, cos, sin, rk, rv, torch.tensor([p]), heads, d**-0.5, compute=torch.float64
    )
    out = attention.decode_attention(qkv, cos, sin, kc, vc, torch.tensor([p], device="cuda"), heads, d**-0.5, ws)
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), expect.double(), rtol=tol, atol=tol)
    torch.testing.assert_close(vc, rv, rtol=0, atol=0)
    torch.testing.assert_close(kc.double(), rk.double(), rtol=tol, atol=tol)  # rotary: one rounding each
    assert (kc != rk).sum() <= kc.shape[-1] * b * kv_heads  # only position p may differ (by an ulp)
    assert int(ws.counters.abs().sum()) == 0  # reset for the next launch


@needs_gpu
@pytest.mark.gpu
def test_kernel_in_a_cuda_graph_reads_the_position_on_the_device():
    b, heads, kv_heads, d, length = 2, 8, 2, 128, 300
    ws = attention.workspace(b, heads, kv_heads, d, length, "cuda")
    qkv, cos, sin, kc, vc = _inputs(b, heads, kv_heads, d, length, torch.float16, "cuda")
    pos = torch.zeros(1, dtype=torch.int64, device="cuda")
    from qtool.runtime.decoder import capture_graph

    graph, out = capture_graph(lambda: attention.decode_attention(qkv, cos, sin, kc, vc, pos, heads, 0.1, ws))
    for p in (5, 64, 299, 130):
        pos.fill_(p)
        rk, rv = kc.clone(), vc.clone()
        expect = attention.decode_attention_ref(
            qkv, cos, sin, rk, rv, torch.tensor([p]), heads, 0.1, compute=torch.float64
        )
        graph.replay()
        torch.testing.assert_close(out.double(), expect.double(), rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(vc, rv, rtol=0, atol=0)
