"""Kernel fusion of small elementwise/reduction chains by torch.compile, on CUDA only.

At batch 1 a decode step is launch- and latency-bound: a norm or an activation quantizer written
in torch is 5-10 small kernels, each costing more than its arithmetic. Compiled, each is one.
"""

from __future__ import annotations

import functools
import os

import torch

RECOMPILE_LIMIT = 64


@functools.cache
def _compiler_ready() -> bool:
    if os.environ.get("QTOOL_COMPILE", "1") == "0":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def fused(fn):
    """`fn` compiled by torch.compile when it runs on CUDA tensors (one kernel for a chain of
    elementwise ops and reductions); eager on the CPU, without Triton, or with QTOOL_COMPILE=0."""
    compiled = None

    @functools.wraps(fn)
    def call(*args):
        nonlocal compiled
        if not (args[0].is_cuda and _compiler_ready()):
            return fn(*args)
        if compiled is None:
            # each fused function specializes on batch/length 1 vs more, a missing residual and its
            # quantizer's constants: more variants than dynamo's default limit of 8 allows
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
            compiled = torch.compile(fn, fullgraph=True)
        return compiled(*args)

    return call
