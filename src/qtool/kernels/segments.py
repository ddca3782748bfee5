"""Cutting K into segments: every weight-group and activation-cluster boundary starts a new one.

The low-bit GEMMs flush their integer dot product whenever the weight scale or the activation
scale changes, so each segment is padded to whole k-tiles (256 codes for bit-planes, 32 for u8)
and a tile never straddles two segments. Weights and activations are packed in this padded order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qtool.core.errors import QtoolError

TILE = {"planes": 256, "u8": 32}


@dataclass(frozen=True)
class Segments:
    """Original K offsets of each segment, its weight group and cluster, and its padded tile offsets."""

    k: int
    tile: int
    bounds: tuple[int, ...]  # S+1 offsets in original K
    group_of: tuple[int, ...]  # weight group index per segment
    cluster_of: tuple[int, ...]  # activation cluster index per segment
    clusters: tuple[int, ...]  # C+1 cluster boundaries
    ptile: tuple[int, ...]  # S+1 padded tile offsets
    ntiles: int  # total tiles, ptile[-1] rounded up for vector loads

    @property
    def count(self) -> int:
        return len(self.bounds) - 1

    @property
    def padded(self) -> int:
        return self.ntiles * self.tile

    def lengths(self) -> list[int]:
        return [b - a for a, b in zip(self.bounds[:-1], self.bounds[1:])]

    def positions(self) -> torch.Tensor:
        """Padded position of every original k (int64 [K])."""
        parts = [torch.arange(n) + self.ptile[s] * self.tile for s, n in enumerate(self.lengths())]
        return torch.cat(parts)

    def tile_seg(self) -> torch.Tensor:
        """Segment of every padded tile, -1 for the tail padding (int32 [ntiles])."""
        out = torch.full((self.ntiles,), -1, dtype=torch.int32)
        for s in range(self.count):
            out[self.ptile[s] : self.ptile[s + 1]] = s
        return out

    def chunk_seg(self) -> torch.Tensor:
        """Segment of every 32-code chunk of the padded axis (int32 [padded / 32])."""
        return self.tile_seg().repeat_interleave(self.tile // 32)


def cluster_bounds(k: int, clusters) -> tuple[int, ...]:
    """Validated cluster boundaries [0, ..., k]; None means one cluster (per-token scales)."""
    if clusters is None:
        return (0, k)
    b = tuple(int(v) for v in (clusters.tolist() if torch.is_tensor(clusters) else clusters))
    if len(b) < 2 or b[0] != 0 or b[-1] != k or any(x >= y for x, y in zip(b[:-1], b[1:])):
        raise QtoolError(
            f"cluster boundaries must rise strictly from 0 to K={k}; got {b[:4]}...{b[-2:]}: "
            "pass RPTQ's cumulative cluster sizes with a leading 0"
        )
    return b


def make_segments(k: int, group: int | None, clusters, layout: str) -> Segments:
    """Segments for weights grouped by `group` along K (None = per channel) and activation clusters."""
    if layout not in TILE:
        raise QtoolError(f"unknown low-bit layout {layout!r}: use 'planes' or 'u8'")
    if k <= 0:
        raise QtoolError(f"K must be positive, got {k}")
    g = k if group is None else int(group)
    if g <= 0:
        raise QtoolError(f"group size must be positive, got {group}: use e.g. 64, 128 or None for per-channel")
    cb = cluster_bounds(k, clusters)
    bounds = sorted(set(range(0, k, g)) | set(cb) | {k})
    tile = TILE[layout]
    ptile = [0]
    for a, b in zip(bounds[:-1], bounds[1:]):
        ptile.append(ptile[-1] + -(-(b - a) // tile))
    align = 4 if layout == "u8" else 1
    ntiles = -(-ptile[-1] // align) * align
    starts = bounds[:-1]
    group_of = tuple(a // g for a in starts)
    cluster_of = tuple(max(i for i, c in enumerate(cb[:-1]) if c <= a) for a in starts)
    return Segments(k, tile, tuple(bounds), group_of, cluster_of, cb, tuple(ptile), ntiles)
