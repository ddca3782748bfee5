"""Every kernels/cuda/*.cu must compile for sm_90 (and sm_80), so a broken kernel cannot land."""

import shutil
import subprocess
from pathlib import Path

import pytest

SOURCES = sorted((Path(__file__).resolve().parents[2] / "kernels" / "cuda").glob("*.cu"))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.name)
def test_kernel_compiles(src, arch, tmp_path):
    out = tmp_path / f"{src.stem}.{arch}.cubin"
    r = subprocess.run(["nvcc", f"-arch={arch}", "-cubin", "-DQTOOL_INSTANTIATE", "-o", str(out), str(src)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size > 0


def test_sources_exist():
    assert {p.name for p in SOURCES} >= {"quantize_act.cu", "lowbit_gemm.cu", "wonly_gemv.cu"}
