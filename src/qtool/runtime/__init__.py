"""Packed runtime: the modules that run a quantized model (packed linears and models, the Decoder,
norm gathers, exports for other runtimes) on the kernels below."""
