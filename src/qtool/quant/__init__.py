"""Quantizers, fake-quantized modules and the methods built on them."""
