"""qtool: low-bit quantization of LLMs (RPTQ, OmniQuant, EfficientQAT, ABQ-LLM) with real kernels."""

from qtool.core import __version__

__all__ = ["Decoder", "__version__", "load"]


def load(path, device="auto", dtype=None):
    """A packed checkpoint (`qtool pack`) as a transformers model whose block linears run qtool's
    kernels on a GPU and their torch reference on the CPU; `generate()` works as usual."""
    from qtool.core.devices import pick_device
    from qtool.runtime.packed_model import load_packed

    return load_packed(path, dtype, pick_device(device))


def __getattr__(name):
    """`qtool.Decoder` (fast generation, qtool.runtime.decoder), imported on first use like `load`'s imports."""
    if name == "Decoder":
        from qtool.runtime.decoder import Decoder

        return Decoder
    raise AttributeError(f"module 'qtool' has no attribute {name!r}")
