"""Running a kernels/cuda/*.cu source on the CPU (g++ against cuda_host_shim.h), shared by the host
tests: its inline-PTX helpers swapped by name for the shim's C++ versions, and the compiled library
cached in the temp directory by a hash of its code."""

import ctypes
import hashlib
import os
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
SHIM = Path(__file__).with_name("cuda_host_shim.h")


def kernel_source(name: str, helpers: tuple[str, ...]) -> str:
    """kernels/cuda/`name` with each helper's definition replaced by the shim's (EMU_HELPERS)."""
    src = (ROOT / "kernels" / "cuda" / name).read_text()
    first = None
    for helper in helpers:
        m = re.search(rf"(template <[^>]*> )?__device__ __forceinline__ [\w:<>]+ {helper}\(", src)
        assert m, f"helper {helper} not found in {name}: update tests/kernels/cuda_host_shim.h"
        depth, i = 0, src.index("{", m.end())
        while True:  # to the body's closing brace
            depth += {"{": 1, "}": -1}.get(src[i], 0)
            i += 1
            if depth == 0:
                break
        first = m.start() if first is None else min(first, m.start())
        src = src[: m.start()] + f"/* {helper}: shim */" + src[i:]
    return src[:first] + "EMU_HELPERS\n" + src[first:]


def build(code: str, name: str) -> ctypes.CDLL:
    """`code` (after the shim's #include) compiled into a shared library, once per distinct code."""
    code = f'#include "{SHIM}"\n' + code
    tag = hashlib.sha1((code + SHIM.read_text()).encode()).hexdigest()[:16]
    so = Path(tempfile.gettempdir()) / f"qtool_{name}_{tag}.so"
    if not so.exists():
        cpp, tmp = so.with_suffix(".cpp"), so.with_suffix(f".{os.getpid()}.so")  # renamed when built: parallel runs
        cpp.write_text(code)
        r = subprocess.run(
            ["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-w", "-o", str(tmp), str(cpp)],
            check=False,
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stderr[-4000:]
        os.replace(tmp, so)
    return ctypes.CDLL(str(so))


def u16(t: torch.Tensor) -> np.ndarray:
    """A 16-bit float tensor's bit patterns as a contiguous uint16 array."""
    return t.contiguous().view(torch.int16).numpy().view(np.uint16).copy()
