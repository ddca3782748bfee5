"""qtool: low-bit quantization of LLMs (RPTQ, OmniQuant, EfficientQAT, ABQ-LLM) with real kernels."""

__version__ = "0.1.0"
