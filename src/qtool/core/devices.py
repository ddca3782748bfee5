"""Devices and dtypes by name, as the command line gives them."""

from __future__ import annotations

import torch

from qtool.core.errors import QtoolError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise QtoolError(f"unknown device '{name}'; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise QtoolError(
            f"device '{name}' asked for but only {torch.cuda.device_count()} CUDA GPU(s) are visible; "
            "use --device cpu or another index"
        )
    return device


def pick_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise QtoolError(f"unknown dtype '{name}'; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def cast_parameters(model, dtype: torch.dtype, keep=()) -> None:
    """Float parameters but those in `keep` to `dtype`, in place, as loading in `dtype` leaves them
    (buffers such as rotary frequencies stay as they are). eval and pack load in fp32 and cast after
    or around quantization: codes and scales come from the stored weights, whatever the dtype."""
    kept = {id(p) for p in keep}
    for p in model.parameters():
        if p.is_floating_point() and id(p) not in kept:
            p.data = p.data.to(dtype)
    model.config.dtype = dtype
