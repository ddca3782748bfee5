"""qtool: low-bit quantization of LLMs (RPTQ, OmniQuant, EfficientQAT, ABQ-LLM) with real kernels."""

__version__ = "0.1.0"


def load(path, device="auto", dtype=None):
    """A packed checkpoint (`qtool pack`) as a transformers model whose block linears run qtool's
    kernels on a GPU and their torch reference on the CPU; `generate()` works as usual."""
    from qtool.packed.model import load_packed
    from qtool.runtime import pick_device

    return load_packed(path, dtype, pick_device(device))


def __getattr__(name):
    """`qtool.Decoder` (fast generation, qtool.decoder), imported on first use like `load`'s imports."""
    if name == "Decoder":
        from qtool.decoder import Decoder

        return Decoder
    raise AttributeError(f"module 'qtool' has no attribute {name!r}")
