"""Every kernels/cuda/*.cu must compile for sm_90 (and sm_80), so a broken kernel cannot land."""

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from qtool.kernels.ops import (
    GEMV_MAX_M,
    SIMT_CODES,
    SIMT_FUSED,
    SIMT_MAX_M,
    SIMT_PLAIN,
    SIMT_WARPS,
    WG_NT,
    mma_plan,
    simt_plan,
)

SOURCES = sorted((Path(__file__).resolve().parents[2] / "kernels" / "cuda").glob("*.cu"))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.name)
def test_kernel_compiles(src, arch, tmp_path):
    out = tmp_path / f"{src.stem}.{arch}.cubin"
    r = subprocess.run(
        ["nvcc", f"-arch={arch}", "-cubin", "-DQTOOL_INSTANTIATE", "-o", str(out), str(src)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size > 0


def test_sources_exist():
    assert {p.name for p in SOURCES} >= {"quantize_act.cu", "lowbit_gemm.cu", "wonly_gemv.cu"}


def _simt_instantiations() -> list[str]:
    """Every wonly_gemv_simt<B, MT, U, NSEG, T, MODE, W> that ops.w_only_gemm's default dispatch launches (its plan
    depends on bits, group 32 or not and M only; M up to SIMT_MAX_M: the W4/W8 instantiations for M > 1,
    which only a forced impl='simt' reaches, may spill a few bytes since the fused prologue)."""
    names = {
        f"wonly_gemv_simt<{bits}, {mt}, {u}, {nseg}, {t}, {mode}, {SIMT_WARPS[mode != SIMT_PLAIN]}>"
        for mode in (SIMT_PLAIN, SIMT_FUSED, SIMT_CODES)
        for bits in (2, 3, 4, 8)
        if mode != SIMT_CODES or bits <= 4
        for group in (32, 64)
        for m in range(1, SIMT_MAX_M[bits] + 1)
        for mt, _, u, nseg, _ in [simt_plan(bits, group, 16, m)]
        for t in ("F16", "BF16")
    }
    return sorted(names)


def _mma_instantiations() -> list[str]:
    """Every wonly_gemv<B, NT, M16, T> (mma GEMV) that ops.w_only_gemm can launch."""
    names = {
        f"wonly_gemv<{bits}, {nt}, {str(m16).lower()}, {t}>"
        for bits in (2, 3, 4, 8)
        for m in range(1, GEMV_MAX_M + 1)
        for nt, m16 in [mma_plan(bits, m)]
        for t in ("F16", "BF16")
    }
    return sorted(names)


def _spills(names: list[str], args: str, tmp_path: Path, arch: str = "sm_90") -> list[tuple[str, str, str]]:
    """ptxas -v of the instantiations `names` (kernel argument list `args`): (mangled name, stack frame
    bytes, spill store bytes) of each. Each is compiled alone, as cuda_runtime compiles one name expression
    per module: ptxas' allocation for one instantiation depends on what else shares its translation unit.
    A ptxas performance warning (wgmma serialized) fails the compile here."""
    src = SOURCES[0].parent / "wonly_gemv.cu"

    def compile_one(i):
        cu = tmp_path / f"k{i}.cu"
        cu.write_text(f'#include "{src}"\ntemplate __global__ void {names[i]}{args};\n')
        r = subprocess.run(
            ["nvcc", f"-arch={arch}", "-cubin", "-Xptxas", "-v", "-o", str(cu.with_suffix(".cubin")), str(cu)],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        assert "Performance Loss" not in r.stderr, (names[i], r.stderr[-3000:])
        return r.stderr

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        log = "".join(pool.map(compile_one, range(len(names))))
    found = re.findall(
        r"Function properties for (_Z\d+wonly_(?:gemv|wgmma)\w+)\n\s+(\d+) bytes stack frame, (\d+) bytes spill stores",
        log,
    )
    assert len(found) == len(names)
    return found


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_simt_gemv_does_not_spill(tmp_path):
    """ptxas -v: no local-memory spills in any plain SIMT GEMV instantiation the dispatch can reach (launch
    bounds cap them at 128 registers: 2 blocks of 256 threads or 1 of 512 per SM); with the fused prologue
    or codes (MODE 1, 2: mangled 'Li1ELi16E', 'Li2ELi16E'), at most 32 bytes: compiled alone, the W3
    fused instantiations with two groups per word spill (bf16 4 bytes, fp16 32 bytes on nvcc 13.0)."""
    args = (
        "(const u32*, const u32*, const u16*, const u8*, const u16*, const u16*, u16*, "
        "int, int, int, int, int, int, int, int, int, const u16*, float, int, const u16*)"
    )
    found = _spills(_simt_instantiations(), args, tmp_path)
    assert [f for f in found if "Li0ELi8E" in f[0] and f[1:] != ("0", "0")] == []
    assert [f for f in found if "Li0ELi8E" not in f[0] and int(f[2]) > 32] == []


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_mma_gemv_does_not_spill(tmp_path):
    """ptxas -v: no spills in any mma GEMV instantiation the dispatch can reach (128 registers for 4 blocks
    of 128 threads per SM; held in registers, the scales and zeros of the prefetched stage spilled)."""
    args = "(const u32*, const u32*, const u16*, const u8*, const u16*, const u16*, u16*, int, int, int, int, int, int)"
    assert [f for f in _spills(_mma_instantiations(), args, tmp_path) if f[1:] != ("0", "0")] == []


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_wgmma_gemm_does_not_spill_or_serialize(tmp_path):
    """ptxas -v for sm_90a: no spills in any wonly_wgmma instantiation (one block of 256 threads per SM,
    up to 255 registers), and no wgmma serialization (ptxas serializes every wgmma, and says so, where
    a path may redefine the A fragments or accumulators of a group still in flight)."""
    names = [f"wonly_wgmma<{b}, {nt}, {t}>" for b in (2, 3, 4, 8) for nt in WG_NT for t in ("F16", "BF16")]
    args = (
        "(const u32*, const u32*, const u16*, const u8*, const u16*, const u16*, u16*, float*, "
        + ", ".join(["int"] * 8)
        + ")"
    )
    assert [f for f in _spills(names, args, tmp_path, arch="sm_90a") if f[1:] != ("0", "0")] == []
