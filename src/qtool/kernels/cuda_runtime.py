"""Compiling kernels/cuda/*.cu with CuPy (NVRTC) at run time and launching them on torch's stream.

One compiled module per (source, template instantiation, options) is kept for the process; CuPy also
caches the compiled binaries on disk, so a second process does not recompile.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch

from qtool.core.errors import QtoolError
from qtool.core.paths import bundled_dir

SOURCE_DIR = Path(os.environ.get("QTOOL_KERNEL_SRC") or bundled_dir("cuda"))
_MODULES: dict = {}  # (source, name_expression, options) -> cupy.RawModule


def cupy_available() -> bool:
    try:
        import cupy  # noqa: F401
    except Exception:
        return False
    return True


def on_gpu(*tensors) -> bool:
    """True when every tensor lives on CUDA and CuPy can compile kernels; otherwise use the reference."""
    return all(t.is_cuda for t in tensors if t is not None) and cupy_available()


def _arch_option() -> str:
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        raise QtoolError(
            f"qtool kernels need an sm_80+ GPU (mma.sync b1/u8, bf16), found sm_{major}{minor}: "
            "run on CPU references instead"
        )
    # sm_90a (wgmma, setmaxnreg) where the GPU is sm_90: a module compiled here runs on this GPU only anyway
    return f"--gpu-architecture=sm_{major}{minor}{'a' if (major, minor) == (9, 0) else ''}"


def kernel(source: str, name: str):
    """The compiled function `name` (a template instantiation such as 'wonly_gemv<4, 1, F16>')."""
    import cupy

    options = ("--std=c++17", _arch_option())
    key = (source, name, options)
    if key not in _MODULES:
        path = SOURCE_DIR / source
        if not path.exists():
            raise QtoolError(f"kernel source {path} not found: run from a qtool checkout or set QTOOL_KERNEL_SRC")
        _MODULES[key] = cupy.RawModule(code=path.read_text(), options=options, name_expressions=[name])
    return _MODULES[key].get_function(name)


def ptr(t: torch.Tensor | None) -> np.uint64:
    return np.uint64(0 if t is None else t.data_ptr())


def i32(v: int) -> np.int32:
    return np.int32(v)


def f32(v: float) -> np.float32:
    return np.float32(v)


def handle(fn) -> int:
    """The CUfunction of a compiled kernel: CuPy's RawKernel keeps it in `.kernel` (a Function)."""
    return fn.ptr if hasattr(fn, "ptr") else fn.kernel.ptr


def allow_shared(fn, nbytes: int) -> None:
    """Let `fn` take `nbytes` of dynamic shared memory (where dynamic + static shared memory exceed
    48 KiB the driver needs an opt-in; asked from 32 KiB so a kernel's static part always fits)."""
    from cupy_backends.cuda.api import driver

    h = handle(fn)
    if nbytes > 32 * 1024 and _SHARED_OPT_IN.get(h, 0) < nbytes:
        driver.funcSetAttribute(h, driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, nbytes)
        _SHARED_OPT_IN[h] = nbytes


_SHARED_OPT_IN: dict = {}  # function handle -> dynamic shared memory bytes allowed


def blocks_per_sm(fn, threads: int, shared_mem: int) -> int:
    """Resident blocks per SM for this launch shape (registers, shared memory, threads); asked of the
    driver once per shape (the dispatch asks on every call)."""
    key = (handle(fn), threads, shared_mem)
    if key not in _OCCUPANCY:
        from cupy_backends.cuda.api import driver

        allow_shared(fn, shared_mem)
        _OCCUPANCY[key] = driver.occupancyMaxActiveBlocksPerMultiprocessor(key[0], threads, shared_mem)
    return _OCCUPANCY[key]


_OCCUPANCY: dict = {}  # (function handle, threads, dynamic shared bytes) -> resident blocks per SM


def device_attribute(attr: str, device: int | None = None) -> int:
    """A CUDA device attribute by its runtime name, e.g. 'cudaDevAttrMultiProcessorCount' (cached: the
    dispatch asks on every call)."""
    return _device_attribute(attr, torch.cuda.current_device() if device is None else device)


@functools.lru_cache(maxsize=64)
def _device_attribute(attr: str, device: int) -> int:
    from cupy.cuda import runtime

    return runtime.deviceGetAttribute(getattr(runtime, attr), device)


def launch(fn, grid, block, args, shared_mem: int = 0) -> None:
    """Launch on torch's current stream of the tensors' device, so ordering with torch ops holds."""
    import cupy

    stream = torch.cuda.current_stream()
    with cupy.cuda.Device(stream.device.index), cupy.cuda.ExternalStream(stream.cuda_stream):
        allow_shared(fn, shared_mem)
        fn(tuple(grid), tuple(block), tuple(args), shared_mem=shared_mem)


def type_tag(dtype: torch.dtype) -> str:
    if dtype == torch.float16:
        return "F16"
    if dtype == torch.bfloat16:
        return "BF16"
    raise QtoolError(f"kernels take fp16 or bf16 activations, got {dtype}: cast x with .half() or .bfloat16()")
