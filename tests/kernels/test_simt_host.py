"""CPU: the SIMT W-only GEMV's own CUDA source (kernels/cuda/wonly_gemv.cu) run on the host against the
torch reference, so its indexing, shared-memory swizzle, cursors and bit tricks are checked without a GPU.

The inline-PTX helpers are swapped by name for C++ equivalents (cuda_host_shim.h: _Float16 with one
rounding per instruction, PRMT, LOP3); everything else is the kernel text as NVRTC compiles it. Each
CUDA thread is a std::thread, blocks run one after another; shared memory starts NaN-poisoned and y
NaN-filled, so unwritten values show. Grids are small (nblk = 1 gives each warp many row groups).
"""

import ctypes
import shutil

import numpy as np
import pytest
import torch
from host_kernel import build as build_library
from host_kernel import kernel_source, u16

from qtool.core.quantizer import minmax_qparams
from qtool.kernels import ops, pack_wonly
from qtool.kernels.layouts import wonly_row_words
from qtool.kernels.reference import (
    per_token_codes_ref,
    w_only_gemm_ref,
    wonly_prologue_ref,
)

HELPERS = (
    "h2f",
    "f2h",
    "f2bf",
    "hsub2",
    "hmul2",
    "lop_and_or",
    "hfma2",
    "prmt",
    "f2h2",
    "hmin2",
    "hmax2",
    "ld_stream_if",
    "ld_v2_if",
    "ld_sz_if",
    "cp_async_zfill",
    "cp_async_wait_all",
    "prefetch_l2",
)
pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not on PATH")

# (bits, dtype, m, n, k, group, nblk, x scale): ragged groups (576/128, 1056/64 -> G = 5, 17), K = 32 * odd,
# per-channel, group 32 (two groups per W2/W3 chunk), N not a multiple of the 16 rows of a block,
# M sliced (5, 9), one block (many row groups per warp, several k-steps), more warps than rows, and x
# magnitudes that make the kernel pre-scale x (fp16 x > 2^L: down; bf16 x: up or down)
CASES = [
    (bits, dtype, m, n, k, group, nblk, xs)
    for bits in (2, 3, 4, 8)
    for dtype in (torch.float16, torch.bfloat16)
    for m, n, k, group, nblk, xs in [
        (1, 77, 352, 32, 1, 1),
        (2, 40, 576, 128, 2, 1),
        (3, 33, 96, None, 1, 1),
        (4, 50, 1056, 64, 3, 1),
        (1, 19, 4160, 128, 1, 1),
        (5, 9, 224, 32, 1, 1),
        (9, 24, 576, 64, 1, 1),
        (2, 21, 64, 32, 1, 600.0 if dtype == torch.float16 else 1e-30),
        (1, 21, 320, 64, 1, 40.0 if dtype == torch.float16 else 1e30),
    ]
]


def _source() -> str:
    """wonly_gemv.cu with its PTX helpers replaced by the shim's and shared memory made block-static."""
    src = kernel_source("wonly_gemv.cu", HELPERS)
    src = src.replace("extern __shared__ uint4 xsm[];", "uint4* xsm = emu_smem;")
    return src.replace("__shared__", "static")


def _configs():
    return sorted({_config(bits, dtype, m, k, group) for bits, dtype, m, n, k, group, nblk, _ in CASES})


def _pack(bits, n, k, group, gen):
    ng = -(-k // (group or k))
    codes = torch.randint(0, 2**bits, (n, k), generator=gen)
    scales = torch.rand(n, ng, generator=gen) * 0.02 + 0.005
    zeros = torch.randint(0, 2**bits, (n, ng), generator=gen).float()
    return pack_wonly(codes, bits, scales, zeros, group)


@pytest.fixture(scope="module")
def lib():
    return build(_configs())


def build(configs) -> ctypes.CDLL:
    """A shared library running wonly_gemv_simt<B, MT, U, NSEG, T, MODE> for each (B, MT, U, NSEG, 'F16'|'BF16', MODE)
    (MODE SIMT_FUSED or SIMT_CODES: the host runs the fused instantiation, with no ops, as the plain GEMV)."""
    launch = (
        f"const unsigned THREADS = {32 * ops.SIMT_WARPS[True]};\n"
        + """
template <int B, int MT, int U, int NSEG, class T, int MODE>
void emu_launch(const u32* wq, const u32* whi, const u16* scales, const u8* zeros, const u16* x, const u16* bias,
                u16* y, int M, int N, int K, int row_words, int G, int gshift, int nblk, int ldx, int gated,
                const u16* nw, float eps, int abits, const u16* res, int grid, long smem) {
  std::vector<uint4> sm(smem / 16 + 1);
  blockDim.x = THREADS;
  gridDim.x = grid;
  for (int b = 0; b < grid; ++b) {
    std::fill(sm.begin(), sm.end(), uint4{0x7e017e01u, 0x7e017e01u, 0x7e017e01u, 0x7e017e01u});  // fp16 NaN
    emu_smem = sm.data();
    emu_block(THREADS, [=] {
      blockIdx.x = b;
      wonly_gemv_simt<B, MT, U, NSEG, T, MODE, THREADS / 32>(wq, whi, scales, zeros, x, bias, y, M, N, K, row_words,
                                                             G, gshift, nblk, ldx, gated, nw, eps, abits, res);
    });
  }
}
extern "C" int run_simt(int B, int MT, int U, int NSEG, int f16, int MODE, const u32* wq, const u32* whi,
                        const u16* scales, const u8* zeros, const u16* x, const u16* bias, u16* y, int M, int N, int K,
                        int row_words, int G, int gshift, int nblk, int ldx, int gated, const u16* nw, float eps,
                        int abits, const u16* res, int grid, long smem) {
"""
    )
    for b, mt, u, nseg, t, mode in configs:
        launch += (
            f"  if (B == {b} && MT == {mt} && U == {u} && NSEG == {nseg} && f16 == {int(t == 'F16')} "
            f"&& MODE == {mode}) return emu_launch<{b}, {mt}, {u}, {nseg}, {t}, {mode}>(wq, whi, scales, zeros, x, "
            "bias, y, M, N, K, row_words, G, gshift, nblk, ldx, gated, nw, eps, abits, res, grid, smem), 0;\n"
        )
    launch += "  return 1;\n}\n"
    return build_library(_source() + launch, "simt_host")


def run(
    lib,
    w,
    x: torch.Tensor,
    bias: torch.Tensor | None,
    nblk: int,
    gated: bool = False,
    norm=None,
    a_bits=None,
    residual=None,
) -> torch.Tensor:
    """y = x' @ w_hat^T + bias (+ residual) from the host-run kernel, on a grid of nblk blocks per x slice
    (x' = x after the prologue: see ops.w_only_gemm)."""
    m = x.shape[0]
    mt, slices, u, nseg, _ = ops.simt_plan(w.bits, w.group, w.row_words, m)
    smem = ops._simt_smem(w, m, gated, norm is not None)
    y = np.full((m, w.n), 0x7E01, dtype=np.uint16)  # NaN
    words = [np.ascontiguousarray(t.numpy().view(np.uint32)) for t in (w.data, w.hi if w.hi is not None else w.data)]
    groups = [u16(w.scales), np.ascontiguousarray(w.zeros.numpy())]
    halves = [u16(t) if t is not None else None for t in (x, bias, None if norm is None else norm[0], residual)]
    ptr = [
        a.ctypes.data_as(ctypes.c_void_p) if a is not None else None
        for a in (*words, *groups, *halves[:2], y, *halves[2:])
    ]
    mode = ops.simt_mode(w.bits, w.scales.shape[1], a_bits, True)
    rc = lib.run_simt(
        w.bits,
        mt,
        u,
        nseg,
        int(x.dtype == torch.float16),
        mode,
        *ptr[:7],
        m,
        w.n,
        w.k,
        w.row_words,
        w.scales.shape[1],
        ops._gshift(w),
        nblk,
        x.shape[1],
        int(gated),
        ptr[7],
        ctypes.c_float(norm[1] if norm else 0.0),
        a_bits or 0,
        ptr[8],
        nblk * slices,
        ctypes.c_long(smem),
    )
    assert rc == 0, "instantiation not built"
    return torch.from_numpy(y.view(np.int16)).view(x.dtype)


@pytest.mark.parametrize("bits,dtype,m,n,k,group,nblk,xs", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_simt_gemv_host(lib, bits, dtype, m, n, k, group, nblk, xs):
    gen = torch.Generator().manual_seed(bits * 131 + m * 17 + n + k + nblk)
    w = _pack(bits, n, k, group, gen)
    x = (torch.randn(m, k, generator=gen) * xs).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    out = run(lib, w, x, bias, nblk)
    assert not torch.isnan(out).any(), "kernel left unwritten (NaN) outputs"
    expect = w_only_gemm_ref(x.double(), w, bias, compute_dtype=torch.float64).double()
    err = (out.double() - expect).abs().max().item()
    assert err <= 1e-2 * expect.abs().max().item(), f"max err {err:.3g} vs max |ref| {expect.abs().max().item():.3g}"


# (bits, dtype, m, n, k, group, gated, norm, a_bits, residual): each prologue op alone and the decoder's
# combinations (norm + quant into q|k|v and gate|up, gate + quant + residual into down, quant + residual
# into o), sliced M, W8's split units, a ragged last k-step
PROLOGUE_CASES = [
    (2, torch.float16, 1, 40, 352, 64, True, False, None, False),
    (4, torch.float16, 1, 24, 576, 128, False, True, None, False),
    (2, torch.float16, 1, 33, 320, 64, False, False, 8, False),
    (4, torch.bfloat16, 1, 24, 320, 64, False, False, 4, True),
    (2, torch.float16, 1, 48, 576, 64, False, True, 8, False),
    (2, torch.bfloat16, 5, 30, 352, 32, True, False, 8, True),
    (3, torch.float16, 4, 21, 224, 32, False, True, 4, False),
    (8, torch.float16, 1, 19, 416, None, True, False, 8, True),
    (4, torch.float16, 1, 21, 4160, 128, False, True, 8, False),
    # per-channel W2-W4 with quantization: x stays integer codes (SIMT_CODES)
    (2, torch.float16, 1, 33, 4160, None, False, False, 8, False),
    (2, torch.float16, 1, 40, 352, None, False, True, 8, True),
    (4, torch.bfloat16, 5, 30, 576, None, True, False, 8, True),
    (3, torch.float16, 4, 21, 224, None, False, True, 4, False),
]


@pytest.fixture(scope="module")
def prologue_lib():
    return build(sorted({_config(c[0], c[1], c[2], c[4], c[5], c[8]) for c in PROLOGUE_CASES}))


def _config(bits, dtype, m, k, group, a_bits=None):
    mt, _, u, nseg, _ = ops.simt_plan(bits, group or k, wonly_row_words(k, bits), m)
    groups = -(-k // (group or k))
    return bits, mt, u, nseg, "F16" if dtype == torch.float16 else "BF16", ops.simt_mode(bits, groups, a_bits, True)


@pytest.mark.parametrize(
    "bits,dtype,m,n,k,group,gated,norm,a_bits,residual", PROLOGUE_CASES, ids=lambda v: str(v).replace("torch.", "")
)
def test_simt_prologue_host(prologue_lib, bits, dtype, m, n, k, group, gated, norm, a_bits, residual):
    """The fused ops give the values torch's eager ops give (wonly_prologue_ref, then the product)."""
    gen = torch.Generator().manual_seed(bits * 7 + m * 3 + n + k)
    w = _pack(bits, n, k, group, gen)
    x = (torch.randn(m, 2 * k if gated else k, generator=gen) * 2).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    nrm = ((torch.rand(k, generator=gen) + 0.5).to(dtype), 1e-5) if norm else None
    res = torch.randn(m, n, generator=gen).to(dtype) * 4 if residual else None
    out = run(prologue_lib, w, x, bias, 1, gated, nrm, a_bits, res)
    assert not torch.isnan(out).any(), "kernel left unwritten (NaN) outputs"
    if ops.simt_mode(bits, w.scales.shape[1], a_bits, True) == ops.SIMT_CODES:
        # x' = codes * scale, unrounded: against float64 on torch's codes (the partial sums round in fp16)
        expect = w_only_gemm_ref(
            per_token_codes_ref(wonly_prologue_ref(x, gated, nrm), a_bits), w, bias, compute_dtype=torch.float64
        ).double()
        if res is not None:
            expect = expect + res.double()
        err, tol = (
            (out.double() - expect).abs().max().item(),
            2e-3 if dtype == torch.float16 else 8e-3,
        )  # bf16 y: 2^-9 rounding
        assert err <= tol * expect.abs().max().item(), f"max err {err:.3g} vs max |ref| {expect.abs().max().item():.3g}"
        return
    xp = wonly_prologue_ref(x, gated, nrm, a_bits)
    assert not torch.equal(xp, x[:, :k]), "the prologue must change x for this test to see it"
    expect = w_only_gemm_ref(xp.double(), w, bias, compute_dtype=torch.float64).double()
    if res is not None:
        expect = expect + res.double()
    err = (out.double() - expect).abs().max().item()
    assert err <= 1e-2 * expect.abs().max().item(), f"max err {err:.3g} vs max |ref| {expect.abs().max().item():.3g}"
    # against the unfused kernel fed torch's prologue output: the same staged values, so the same y
    # (bit for bit; the norm's sum of squares is summed in another order, so an ulp may differ there)
    plain = run(prologue_lib, w, xp.contiguous(), bias, 1)
    if res is not None:
        plain = res + plain
    if norm:
        diff = (out.double() - plain.double()).abs().max().item()
        assert diff <= 2e-3 * expect.abs().max().item(), f"fused vs unfused: {diff:.3g}"
    else:
        assert torch.equal(out, plain)


def _reciprocal_ties(lo: float, hi: float, bits: int) -> torch.Tensor:
    """The fp16 values v in [lo, hi] whose code under the range [lo, hi] is rint(v / s) but not
    rint(v * (1 / s)) (fp32 math, s as fake_quant_per_token computes it)."""
    s = minmax_qparams(torch.tensor(lo), torch.tensor(hi), 2**bits, sym=False)[0]
    v = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    v = v[(v >= lo) & (v <= hi)]
    return v[(v * (1 / s)).round() != (v / s).round()]


@pytest.mark.parametrize(
    "bits,zero", [(8, 128), (4, 0)]
)  # fake quantization in the prologue (W8), codes (per-channel W4)
def test_simt_quant_reciprocal_ties_host(prologue_lib_ties, bits, zero):
    """The fused quantizer multiplies by 1 / s and divides only near a half integer: on the fp16 values
    where the product and the quotient round apart, x' is still torch's (each output row picks one x
    with a one-hot weight row, (q - z) * s = 1)."""
    lo, hi, a_bits = -6.375, 12.75, 8  # s = 0.075: multiples of s / 2 among the fp16 values
    ties = _reciprocal_ties(lo, hi, a_bits)
    assert ties.numel() >= 3, "the range must hold values where rint(v * (1 / s)) != rint(v / s)"
    k = 320
    x = torch.linspace(lo, hi, k)
    x[2 : 2 + ties.numel()] = ties
    x = x.to(torch.float16).unsqueeze(0)
    n = ties.numel()
    codes = torch.full((n, k), zero)
    codes[torch.arange(n), 2 + torch.arange(n)] = zero + 1
    w = pack_wonly(codes, bits, torch.ones(n, 1), torch.full((n, 1), float(zero)), None)
    out = run(prologue_lib_ties, w, x, None, 1, a_bits=a_bits)
    expect = wonly_prologue_ref(x, a_bits=a_bits)[0, 2 : 2 + n]
    assert torch.equal(out[0], expect)
    # the product alone would have missed: its x' differs from torch's at some of these values
    s, z = minmax_qparams(x.float().amin(), x.float().amax(), 2**a_bits, sym=False)
    naive = ((torch.clamp((ties * (1 / s)).round() + z, 0, 2**a_bits - 1) - z) * s).to(torch.float16)
    assert not torch.equal(naive, expect)


@pytest.fixture(scope="module")
def prologue_lib_ties():
    return build([_config(bits, torch.float16, 1, 320, None, 8) for bits in (8, 4)])
