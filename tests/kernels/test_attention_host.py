"""CPU: the decode-attention kernel's own CUDA source (kernels/cuda/decode_attention.cu) run on the host
against the torch reference, so its rotary, cache store, shared-memory layout, shuffles and split-K
combination (the last block of a (sequence, KV head) combines the partials) are checked without a GPU.

Emulated as in test_simt_host.py (cuda_host_shim.h): the inline-PTX helpers swapped by name, a
std::thread per CUDA thread, the blocks of a launch one after another. All shared memory (dynamic and
static) starts each block NaN-filled, and a NaN guard past the dynamic shared memory must stay intact;
out and the split partials start NaN, so unwritten or out-of-range values show.
"""

import ctypes
import re
import shutil

import numpy as np
import pytest
import torch
from host_kernel import build, kernel_source, u16
from test_attention import _inputs

from qtool.kernels import attention

HELPERS = ("h2f", "f2h", "f2bf", "cp_async16", "cp_async_wait_all")
GUARD = 1024  # bytes past the dynamic shared memory that must stay NaN
pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not on PATH")

# (B, H, Hkv, D), cache length L, chunk (None: attention.workspace's, one SM on the CPU), position, dtype.
# The workspace gives L = 64 one split (B * Hkv >= 2) or two (one KV head), L = 150 three; chunk 16
# forces five splits on L = 70. Positions: 0, a chunk's last key, the next chunk's first key, L - 1; each
# (shape, L) runs two in fp16 and two in bf16.
F16, BF16 = torch.float16, torch.bfloat16
SHAPES = [(1, 4, 4, 64), (2, 6, 2, 64), (1, 8, 1, 128), (1, 2, 2, 128)]
LENGTHS = [(1, None), (64, None), (150, None), (70, 16)]
WHERE = ["first", "chunk_end", "chunk_start", "last"]
CASES = [
    (shape, length, chunk, where, (F16, BF16)[(i + j) % 2])
    for shape in SHAPES
    for i, (length, chunk) in enumerate(LENGTHS)
    for j, where in enumerate(WHERE[: 1 if length == 1 else 4])
]


def _source() -> str:
    """decode_attention.cu with its PTX helpers replaced by the shim's, the dynamic shared memory the
    block's emulated one, and the static shared arrays function statics (reused by the blocks, which
    run one after another) that thread 0 NaN-fills at the start of each block."""
    src = kernel_source("decode_attention.cu", HELPERS)
    src = src.replace("extern __shared__ uint4 dyn[];", "uint4* dyn = emu_smem;")
    decls = list(re.finditer(r"^ *__shared__ \w+ ([^;]+);\n", src, re.MULTILINE))
    names = [re.match(r" *(\w+)", v).group(1) for d in decls for v in d.group(1).split(",")]
    poison = "".join(f"std::memset(&{n}, 0xff, sizeof {n}); " for n in names)
    end = decls[-1].end()
    src = src[:end] + f"  if (threadIdx.x == 0) {{ {poison}}}\n  __syncthreads();\n" + src[end:]
    return src.replace("__shared__", "static")


LAUNCH = """
template <int D, int G, class T>
int emu_launch(const u16* qkv, int qkv_stride, const u16* cosv, const u16* sinv, u16* kc, u16* vc, const long long* pos,
               u16* out, float* ws, u32* counters, int H, int Hkv, int L, int chunk, int splits, float scale, long smem,
               int nbk, int reverse) {
  std::vector<unsigned char> sm(smem + GUARD);
  const int nblk = splits * nbk;  // grid (splits, B * Hkv), y outer, x inner (reverse: backwards)
  blockDim.x = 128;
  gridDim.x = splits;
  gridDim.y = nbk;
  for (int n = 0; n < nblk; ++n) {
    const int blk = reverse ? nblk - 1 - n : n;
    std::memset(sm.data(), 0xff, sm.size());  // NaN as fp16, bf16 and fp32
    emu_smem = reinterpret_cast<uint4*>(sm.data());
    emu_block(128, [=] {
      blockIdx.x = blk % splits;
      blockIdx.y = blk / splits;
      decode_attention<D, G, T>(qkv, qkv_stride, cosv, sinv, kc, vc, pos, out, ws, counters, H, Hkv, L, chunk,
                                splits, scale);
    });
    for (long i = smem; i < (long)sm.size(); ++i)
      if (sm[i] != 0xff) return 2;  // written past the dynamic shared memory
  }
  return 0;
}
"""


def _configs():
    return sorted({(d, h // hkv, "F16" if dt == F16 else "BF16") for (_, h, hkv, d), _, _, _, dt in CASES})


@pytest.fixture(scope="module")
def lib() -> ctypes.CDLL:
    """A shared library running decode_attention<D, G, T> for each (D, G, 'F16'|'BF16') of CASES."""
    code = f"const long GUARD = {GUARD};\n" + _source() + LAUNCH
    code += (
        'extern "C" int run_attention(int D, int G, int f16, const u16* qkv, int qkv_stride, const u16* cosv, '
        "const u16* sinv, u16* kc, u16* vc, const long long* pos, u16* out, float* ws, u32* counters, int H, int Hkv, "
        "int L, int chunk, int splits, float scale, long smem, int nbk, int reverse) {\n"
    )
    for d, g, t in _configs():
        code += (
            f"  if (D == {d} && G == {g} && f16 == {int(t == 'F16')}) "
            f"return emu_launch<{d}, {g}, {t}>(qkv, qkv_stride, cosv, sinv, kc, vc, pos, out, ws, counters, H, Hkv, "
            "L, chunk, splits, scale, smem, nbk, reverse);\n"
        )
    code += "  return 1;\n}\n"
    lib = build(code, "attention_host")
    p = ctypes.c_void_p
    lib.run_attention.argtypes = (
        [ctypes.c_int] * 3
        + [p, ctypes.c_int]
        + [p] * 8
        + [ctypes.c_int] * 5
        + [ctypes.c_float, ctypes.c_long, ctypes.c_int, ctypes.c_int]
    )
    return lib


def _t(a: np.ndarray, dtype) -> torch.Tensor:
    return torch.from_numpy(a.view(np.int16)).view(dtype)


def run(lib, qkv, cos, sin, kc, vc, p: int, heads: int, scale: float, chunk: int, splits: int, reverse=False):
    """(out, k cache, v cache, counters) after the host-run kernel; qkv rows are passed with a NaN-padded stride."""
    b, kv_heads, length, d = kc.shape
    rows = np.full((b, qkv.shape[1] + 24), 0xFFFF, dtype=np.uint16)
    rows[:, : qkv.shape[1]] = u16(qkv)
    k, v, cs, sn = u16(kc), u16(vc), u16(cos), u16(sin)
    pos = np.array([p], dtype=np.int64)
    out = np.full((b, heads * d), 0xFFFF, dtype=np.uint16)
    ws = np.full((b, heads, splits, d + 2), np.nan, dtype=np.float32)
    counters = np.zeros(b * kv_heads, dtype=np.uint32)
    ptr = [a.ctypes.data for a in (rows, cs, sn, k, v, pos, out, ws, counters)]
    g = heads // kv_heads
    rc = lib.run_attention(
        d,
        g,
        int(qkv.dtype == F16),
        ptr[0],
        rows.shape[1],
        *ptr[1:],
        heads,
        kv_heads,
        length,
        chunk,
        splits,
        scale,
        attention.smem_bytes(g, d, chunk),
        b * kv_heads,
        int(reverse),
    )
    assert rc == 0, "instantiation not built" if rc == 1 else "wrote past the dynamic shared memory"
    return _t(out, qkv.dtype), _t(k, qkv.dtype).view(kc.shape), _t(v, qkv.dtype).view(vc.shape), counters


def _ordered(t: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 bit patterns as integers ordered like the values (neighbours differ by one)."""
    i = t.view(torch.int16).int()
    return torch.where(i < 0, -(i & 0x7FFF), i)


@pytest.mark.parametrize("shape,length,chunk,where,dtype", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_decode_attention_host(lib, shape, length, chunk, where, dtype):
    b, heads, kv_heads, d = shape
    if chunk is None:
        ws = attention.workspace(b, heads, kv_heads, d, length, "cpu")
        chunk, splits = ws.chunk, ws.splits
    else:
        splits = -(-length // chunk)
    p = {
        "first": 0,
        "chunk_end": min(chunk - 1, length - 1),
        "chunk_start": min(chunk, length - 1),
        "last": length - 1,
    }[where]
    qkv, cos, sin, kc, vc = _inputs(b, heads, kv_heads, d, length, dtype, "cpu", seed=length + p)
    rk, rv = kc.clone(), vc.clone()
    expect = attention.decode_attention_ref(
        qkv, cos, sin, rk, rv, torch.tensor([p]), heads, d**-0.5, compute=torch.float64
    )
    out, k, v, counters = run(lib, qkv, cos, sin, kc, vc, p, heads, d**-0.5, chunk, splits)
    tol = 2e-3 if dtype == F16 else 1.6e-2
    assert not out.isnan().any(), "kernel left unwritten (NaN) outputs"
    torch.testing.assert_close(out.double(), expect.double(), rtol=tol, atol=tol)
    torch.testing.assert_close(v, rv, rtol=0, atol=0)
    assert (_ordered(k[:, :, p]) - _ordered(rk[:, :, p])).abs().max() <= 1  # rotary: one rounding each
    keep = torch.arange(length) != p
    torch.testing.assert_close(k[:, :, keep], rk[:, :, keep], rtol=0, atol=0)
    assert not counters.any(), "counters not reset for the next launch"
    if splits > 1 and where == "chunk_start":  # another block combines: the same bits
        again = run(lib, qkv, cos, sin, kc, vc, p, heads, d**-0.5, chunk, splits, reverse=True)[0]
        assert torch.equal(again.view(torch.int16), out.view(torch.int16))
