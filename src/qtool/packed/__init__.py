"""Packed checkpoints: qtool's own layout for the kernels, and exports to GPTQ and compressed-tensors."""
