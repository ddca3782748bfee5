"""GPU: every kernel against its torch reference on fresh random inputs, outputs poisoned with NaN.

Tolerance: kernels write fp16/bf16 and accumulate in fp32 (the W-only GEMV's weights are dequantized to
the activation type before its fp32-accumulating mma);
references run in float64 on the same packed operands. One output rounding is 2^-11 (fp16) or 2^-8
(bf16) relative, so we require |y - ref| <= 1e-2 * max|ref| (+ a bf16 allowance) element-wise.
"""

import pytest
import torch

from qtool.kernels import (
    bitplane_gemm,
    chooser,
    ops,
    pack_lowbit,
    pack_wonly,
    quantize_activations,
    u8_gemm,
    w_only_gemm,
)
from qtool.kernels.cuda_runtime import cupy_available
from qtool.kernels.reference import (
    bitplane_gemm_ref,
    per_token_codes_ref,
    quantize_activations_ref,
    u8_gemm_ref,
    w_only_gemm_ref,
    wonly_prologue_ref,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
    pytest.mark.skipif(not cupy_available(), reason="cupy not installed"),
]
MS = [1, 3, 16, 77, 256]


def _weights(n, k, bits, group, gen):
    ng = -(-k // (group or k))
    codes = torch.randint(0, 2**bits, (n, k), generator=gen)
    scales = torch.rand(n, ng, generator=gen) * 0.02 + 0.005
    zeros = torch.randint(0, 2**bits, (n, ng), generator=gen).float()
    return codes, scales, zeros


def _clusters(k, gen):
    """Irregular RPTQ-like cluster boundaries."""
    cuts = sorted(set(torch.randint(1, k, (4,), generator=gen).tolist()))
    return [0, *cuts, k]


def _nan_out(m, n, dtype):
    return torch.full((m, n), float("nan"), dtype=dtype, device="cuda")


def _poison_allocator():
    """Fill cached device memory with NaN bytes so unwritten kernel outputs show up."""
    torch.cuda.empty_cache()
    torch.full((256 << 20,), float("nan"), dtype=torch.float32, device="cuda")


def _close(y, expect, rtol=1e-2):
    assert not torch.isnan(y).any(), "kernel left unwritten (NaN) outputs"
    e = expect.double()
    err = (y.double() - e).abs().max().item()
    scale = e.abs().max().item() + 1e-6
    assert err <= rtol * scale, f"max err {err:.3g} vs max |ref| {scale:.3g}"


@pytest.mark.parametrize("layout", ["planes", "u8"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("m", MS)
def test_quantize_activations(layout, bits, m):
    gen = torch.Generator().manual_seed(bits * 1000 + m)
    k = 1000
    w = pack_lowbit(
        torch.zeros(8, k, dtype=torch.int64), 2, torch.ones(8, 8), torch.zeros(8, 8), 128, _clusters(k, gen), layout
    )
    x = (torch.randn(m, k, generator=gen) * 3).half().cuda()
    _poison_allocator()
    a = quantize_activations(x, bits, w.segments, layout)
    r = quantize_activations_ref(x, bits, w.segments, layout)
    # kernel and reference run the same IEEE fp32 operations (true division, no FMA), so bit-exact
    assert torch.equal(a.scale, r.scale) and torch.equal(a.zero, r.zero)
    assert torch.equal(a.codes(), r.codes())
    assert torch.equal(a.seg_sum, r.seg_sum)
    assert torch.equal(a.data, r.data)  # padding and word order too


BITPLANE = [(1, 1), (2, 2), (2, 8), (3, 5), (4, 4), (8, 8), (1, 8), (8, 1)]


@pytest.mark.parametrize("wbits,abits", BITPLANE)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("n,k,group", [(200, 1000, 128), (77, 4096, None), (1030, 512, 64)])
def test_bitplane_gemm(wbits, abits, m, n, k, group):
    _lowbit_case("planes", bitplane_gemm, bitplane_gemm_ref, wbits, abits, m, n, k, group)


@pytest.mark.parametrize("wbits,abits", [(4, 4), (4, 8), (3, 4), (3, 3), (2, 8), (1, 3), (4, 3)])
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("n,k,group", [(200, 1000, 128), (77, 4096, None), (1030, 512, 32)])
def test_u8_gemm(wbits, abits, m, n, k, group):
    _lowbit_case("u8", u8_gemm, u8_gemm_ref, wbits, abits, m, n, k, group)


@pytest.mark.parametrize("wbits,abits", [(4, 4), (2, 8), (3, 4)])
@pytest.mark.parametrize("m,n,k,group", [(512, 1024, 4096, 128), (130, 1000, 4096, None), (64, 72, 2080, 32)])
def test_u8_gemm_tiled(wbits, abits, m, n, k, group):
    """The shared-memory tiled kernel (the default above M = 16): several stages, ragged tiles, long
    segments (per-channel: int32 runs converted every 32 tiles) and RPTQ clusters."""
    _lowbit_case("u8", u8_gemm, u8_gemm_ref, wbits, abits, m, n, k, group, impl="u8_gemm_tiled")


def _lowbit_case(layout, kernel, reference, wbits, abits, m, n, k, group, impl=None):
    gen = torch.Generator().manual_seed(wbits * 97 + abits * 13 + m + n + k)
    codes, scales, zeros = _weights(n, k, wbits, group, gen)
    w = pack_lowbit(codes.cuda(), wbits, scales.cuda(), zeros.cuda(), group, _clusters(k, gen), layout)
    x = torch.randn(m, k, generator=gen).half().cuda()
    bias = torch.randn(n, generator=gen).half().cuda()
    a = quantize_activations_ref(x, abits, w.segments, layout)
    y = kernel(a, w, bias, out=_nan_out(m, n, torch.float16), impl=impl)
    _close(y, reference(a, w, bias, out_dtype=torch.float64, compute_dtype=torch.float64))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 64, 128, None])
@pytest.mark.parametrize(
    "m", [*MS, 9, 4, 5]
)  # 9: the mma GEMV's second row half partly used; 4 | 5: SIMT | mma for W4/W8
@pytest.mark.parametrize("n,k", [(1000, 352), (77, 4096), (4104, 1024)])
def test_w_only_gemm(bits, group, m, n, k):  # K = 352: ragged last group for groups 64 and 128
    gen = torch.Generator().manual_seed(bits * 31 + m + n + k + (group or 0))
    codes, scales, zeros = _weights(n, k, bits, group, gen)
    w = pack_wonly(codes.cuda(), bits, scales.cuda(), zeros.cuda(), group)
    x = torch.randn(m, k, generator=gen).half().cuda()
    bias = torch.randn(n, generator=gen).half().cuda()
    y = w_only_gemm(x, w, bias, out=_nan_out(m, n, torch.float16))
    _close(y, w_only_gemm_ref(x.double(), w, bias, compute_dtype=torch.float64))


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("m", [1, 5, 40])
def test_w_only_gemm_bf16(bits, m):
    gen = torch.Generator().manual_seed(bits + m)
    codes, scales, zeros = _weights(300, 512, bits, 64, gen)
    w = pack_wonly(codes.cuda(), bits, scales.cuda(), zeros.cuda(), 64)
    x = torch.randn(m, 512, generator=gen).bfloat16().cuda()
    y = w_only_gemm(x, w, out=_nan_out(m, 300, torch.bfloat16))
    _close(y, w_only_gemm_ref(x.double(), w, compute_dtype=torch.float64), rtol=2e-2)


def test_lowbit_bf16_output():
    gen = torch.Generator().manual_seed(5)
    codes, scales, zeros = _weights(64, 512, 2, 128, gen)
    w = pack_lowbit(codes.cuda(), 2, scales.cuda(), zeros.cuda(), 128, None, "planes")
    x = torch.randn(5, 512, generator=gen).bfloat16().cuda()
    a = quantize_activations(x, 8, w.segments)
    y = bitplane_gemm(a, w, out=_nan_out(5, 64, torch.bfloat16))
    _close(y, bitplane_gemm_ref(a, w, out_dtype=torch.float64, compute_dtype=torch.float64), rtol=2e-2)


def _wonly_case(bits, n, k, group, m, dtype, seed, x_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    codes, scales, zeros = _weights(n, k, bits, group, gen)
    w = pack_wonly(codes.cuda(), bits, scales.cuda(), zeros.cuda(), group)
    x = (torch.randn(m, k, generator=gen) * x_scale).to(dtype).cuda()
    bias = torch.randn(n, generator=gen).to(dtype).cuda()
    return w, x, bias


def _wonly_check(w, x, bias, impl):
    m, dtype = x.shape[0], x.dtype
    y = w_only_gemm(x, w, bias, out=_nan_out(m, w.n, dtype), impl=impl)
    _close(
        y,
        w_only_gemm_ref(x.double(), w, bias, compute_dtype=torch.float64),
        rtol=1e-2 if dtype == torch.float16 else 2e-2,
    )


# N not a multiple of a SIMT block's 16 rows; K = 32 * odd; group 32 (two groups per W2/W3 16-byte word);
# ragged last group (576 = 4.5 x 128: G = 5); per-channel; K = 28672 (x of M = 4 fills 224 KiB of shared memory)
SIMT_SHAPES = [(77, 352, 32), (1000, 576, 128), (4104, 1024, 64), (33, 96, None), (40, 28672, 128)]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("n,k,group", SIMT_SHAPES)
def test_w_only_gemv_simt(bits, dtype, m, n, k, group):
    w, x, bias = _wonly_case(bits, n, k, group, m, dtype, bits * 7 + m + n + k)
    if not ops._simt_fits(w, m):
        pytest.skip(f"x of {m} x {k} does not fit this GPU's shared memory")
    _wonly_check(w, x, bias, impl="simt")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("m", [5, 9, 16])
def test_w_only_gemv_simt_sliced(bits, m):
    """M > 4: x rows in slices of <= 4 (<= 3 for W3 and for W2 with group 32), one slice per block."""
    for group in (32, 128):
        _wonly_check(*_wonly_case(bits, 300, 1056, group, m, torch.float16, bits + m + group), impl="simt")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("x_scale", [1e-4, 300.0, 3000.0])
def test_w_only_gemv_simt_x_range(bits, dtype, x_scale):
    """x is staged pre-scaled by 2^-e so that fp16 partials cannot overflow: large, tiny and (bf16) huge x
    (no bias, which would hide tiny outputs). fp16 W8 at 3000 would overflow y itself, so it gets 300."""
    scale = (
        (x_scale if bits < 8 or x_scale < 1000 else 300.0) if dtype == torch.float16 else x_scale**4
    )  # bf16: 1e-16 .. 8e13
    w, x, _ = _wonly_case(bits, 130, 256, 64, 3, dtype, bits + int(x_scale), scale)
    _wonly_check(w, x, None, impl="simt")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("m", [1, 4])
def test_w_only_gemv_simt_windows(bits, m):
    """x non-zero on one window only, so a wrong code, group or step there cannot hide in the rest of K:
    the first chunk, a step boundary, the ragged last group and the last 32 codes."""
    k, group = 4160, 128  # 32 * 130; G = 33 with a 64-code last group
    w, x, bias = _wonly_case(bits, 260, k, group, m, torch.float16, bits * 3 + m)
    for lo, hi in [(0, 64), (1984, 2144), (4096, 4160), (4128, 4160)]:
        xw = torch.zeros_like(x)
        xw[:, lo:hi] = x[:, lo:hi]
        _wonly_check(w, xw, bias, impl="simt")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("m", [1, 3, 8, 16])
@pytest.mark.parametrize("impl", ["mma", "dequant"])
def test_w_only_gemm_forced(bits, m, impl):
    """The tensor-core GEMV and the dequantize + cuBLAS path at M the dispatch may not send them, with a
    ragged last group (K = 576, group 128)."""
    _wonly_check(*_wonly_case(bits, 200, 576, 128, m, torch.float16, bits + m), impl=impl)


def test_w_only_dispatch(tmp_path, monkeypatch):
    monkeypatch.setenv("QTOOL_CACHE", str(tmp_path))  # no measured table: the chooser's default rule
    chooser.reload()

    def packed(k):
        return pack_wonly(
            torch.zeros(16, k, dtype=torch.int64, device="cuda"),
            4,
            torch.ones(16, k // 128, device="cuda"),
            torch.zeros(16, k // 128, device="cuda"),
            128,
        )

    w, s = packed(1024), ops.SIMT_MAX_M[4]
    above = "wgmma" if ops.wgmma_runs(w.data.device) else "dequant"
    for m in (1, s, s + 1, ops.GEMV_MAX_M, ops.GEMV_MAX_M + 1):
        assert ops.w_only_impl(m, w) == ("simt" if m <= s else "mma" if m <= ops.GEMV_MAX_M else above)
    assert ops.w_only_impl(4, packed(65536)) == "mma"  # x of 4 rows would need 512 KiB of shared memory


# (bits, m, n, k, group, gated, norm, a_bits, residual, dtype): the decoder's fused GEMVs at LLaMA-7B
# widths (q|k|v and gate|up take norm + quant, o takes quant + residual, down gate + quant + residual),
# sliced M, bf16
FUSED = [
    (2, 1, 1536, 4096, 64, False, True, 8, False, torch.float16),
    (2, 1, 4096, 4096, 64, False, False, 8, True, torch.float16),
    (2, 1, 4096, 11008, 64, True, False, 8, True, torch.float16),
    (4, 1, 4096, 11008, 128, True, False, None, True, torch.float16),
    (4, 1, 2048, 4096, 128, False, True, None, False, torch.bfloat16),
    (2, 7, 1000, 2048, 64, True, True, 4, True, torch.float16),
    (3, 3, 500, 1024, 32, False, True, 8, True, torch.bfloat16),
    # per-channel W2/W4 with quantization (W2A8's o and down, a norm, sliced M, bf16): x stays codes
    (2, 1, 4096, 4096, None, False, False, 8, False, torch.float16),
    (2, 1, 4096, 11008, None, False, False, 8, True, torch.float16),
    (2, 1, 1536, 4096, None, False, True, 8, False, torch.float16),
    (4, 7, 1000, 2048, None, True, False, 8, True, torch.bfloat16),
    (3, 3, 500, 1024, None, False, True, 4, False, torch.float16),
]


@pytest.mark.parametrize(
    "bits,m,n,k,group,gated,norm,a_bits,residual,dtype", FUSED, ids=lambda v: str(v).replace("torch.", "")
)
@pytest.mark.parametrize("impl", ["simt", "mma", "dequant"])
def test_w_only_gemm_fused_ops(bits, m, n, k, group, gated, norm, a_bits, residual, dtype, impl):
    """The SIMT GEMV's fused prologue / residual against the same ops in torch followed by the unfused
    kernel (equal but for an ulp of the norm's reduction order), and every path against float64."""
    gen = torch.Generator().manual_seed(bits + m + n + k)
    w, _, bias = _wonly_case(bits, n, k, group, m, dtype, bits * 5 + m)
    x = (torch.randn(m, 2 * k if gated else k, generator=gen) * 2).to(dtype).cuda()
    nrm = ((torch.rand(k, generator=gen) + 0.5).to(dtype).cuda(), 1e-5) if norm else None
    res = (torch.randn(m, n, generator=gen) * 4).to(dtype).cuda() if residual else None
    y = w_only_gemm(
        x, w, bias, out=_nan_out(m, n, dtype), impl=impl, gated=gated, norm=nrm, a_bits=a_bits, residual=res
    )
    xp = wonly_prologue_ref(x, gated, nrm, a_bits)
    expect = w_only_gemm_ref(xp.double(), w, bias, compute_dtype=torch.float64) + (0 if res is None else res.double())
    _close(y, expect, rtol=1e-2 if dtype == torch.float16 else 2e-2)
    if impl == "simt" and ops.simt_mode(bits, w.scales.shape[1], a_bits, True) == ops.SIMT_CODES:
        # x' = codes * scale unrounded: against float64 on torch's codes (the partial sums round in fp16)
        codes = per_token_codes_ref(wonly_prologue_ref(x, gated, nrm), a_bits)
        expect = w_only_gemm_ref(codes, w, bias, compute_dtype=torch.float64) + (0 if res is None else res.double())
        _close(y, expect, rtol=2e-3 if dtype == torch.float16 else 8e-3)
        return
    unfused = w_only_gemm(xp, w, bias, impl=impl)
    unfused = unfused if res is None else res + unfused
    if norm:
        _close(y, unfused.double(), rtol=2e-3)
    else:
        assert torch.equal(y, unfused)


# N not a multiple of the 128-row block; K = 32 * odd with a ragged last group; per-channel; group 32 (two
# groups per W2/W3 word); K long enough to be split (4096 = 32 k-tiles of 128 codes)
WGMMA_SHAPES = [(200, 576, 128), (77, 352, 32), (1000, 1056, None), (130, 4096, 64), (4104, 1024, 128)]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 8, 16, 17, 40, 64, 100, 128, 300])
@pytest.mark.parametrize("n,k,group", WGMMA_SHAPES)
def test_w_only_gemm_wgmma(bits, dtype, m, n, k, group):
    """The Hopper GEMM at every x-row tile (NT 16, 32, 64, 128, several tiles of 128), split K or not."""
    if not ops.wgmma_runs(torch.device("cuda")):
        pytest.skip("wgmma needs sm_90")
    _wonly_check(*_wonly_case(bits, n, k, group, m, dtype, bits * 11 + m + n + k), impl="wgmma")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_w_only_gemm_wgmma_windows(bits):
    """x non-zero on one window of K only (the first k16 step, a stage boundary, the ragged last group),
    and on one x row only, so a wrong code, group, step or row cannot hide in the rest of the sum."""
    if not ops.wgmma_runs(torch.device("cuda")):
        pytest.skip("wgmma needs sm_90")
    w, x, bias = _wonly_case(bits, 260, 4160, 128, 70, torch.float16, bits * 5)
    for lo, hi in [(0, 16), (112, 144), (4096, 4160)]:
        xw = torch.zeros_like(x)
        xw[:, lo:hi] = x[:, lo:hi]
        _wonly_check(w, xw, None, impl="wgmma")
    xr = torch.zeros_like(x)
    xr[37] = x[37]
    _wonly_check(w, xr, None, impl="wgmma")
