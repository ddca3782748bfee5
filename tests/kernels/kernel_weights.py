"""Random weight codes, scales and zero points for the packing and reference tests."""

import torch


def random_weights(n, k, bits, group, seed=0):
    g = torch.Generator().manual_seed(seed)
    ng = -(-k // (group or k))
    codes = torch.randint(0, 2**bits, (n, k), generator=g)
    scales = torch.rand(n, ng, generator=g) * 0.05 + 0.01
    zeros = torch.randint(0, 2**bits, (n, ng), generator=g).float()
    return codes, scales, zeros
