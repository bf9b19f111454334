"""Blending windows and the weighted accumulation of tile predictions: pure numpy.

A pixel's class is the argmax of ``sum_t w_t * p_t / sum_t w_t`` over the tiles ``t`` that
cover it, where ``p_t`` are softmax probabilities and ``w_t`` the tile's window. Tiles are
accumulated in global tile order, so the sum (and its rounding) is the same whatever block
computes it.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import numpy as np

from geoseg.tiling import Span, TileGrid

BlendMode = Literal["gaussian", "cosine", "trim"]
NODATA = 255


def window_1d(mode: BlendMode, grid: TileGrid) -> np.ndarray:
    """Per-axis weights of one tile; positive on the tile's support, zero elsewhere."""
    size = grid.tile_size
    centre = np.arange(size, dtype=np.float64) + 0.5 - size / 2
    if mode == "gaussian":
        sigma = size / 8  # the usual sigma_scale of 0.125
        w = np.exp(-0.5 * (centre / sigma) ** 2)
    elif mode == "cosine":
        w = np.sin(np.pi * (np.arange(size) + 0.5) / size) ** 2
    elif mode == "trim":
        w = np.zeros(size)
        core = support(mode, grid)
        w[core.start : core.stop] = 1.0
    else:
        raise ValueError(f"unknown blend mode {mode!r}")
    return w.astype(np.float32)


@lru_cache(maxsize=8)
def window_2d(mode: BlendMode, tile_size: int, overlap: int) -> np.ndarray:
    """Separable 2-D window, computed once per (mode, tile, overlap) and shared read-only."""
    w = window_1d(mode, TileGrid(tile_size, overlap))
    out = np.outer(w, w)
    out.setflags(write=False)
    return out


def support(mode: BlendMode, grid: TileGrid) -> Span:
    """Offsets within a tile where its window is non-zero: trim keeps only the core."""
    if mode == "trim":
        return Span(grid.half_overlap, grid.half_overlap + grid.stride)
    return Span(0, grid.tile_size)


class Accumulator:
    """Weighted sum of class probabilities over one output block."""

    def __init__(self, n_classes: int, rows: Span, cols: Span) -> None:
        self.rows, self.cols = rows, cols
        self.sum = np.zeros((n_classes, rows.size, cols.size), dtype=np.float32)
        self.weight = np.zeros((rows.size, cols.size), dtype=np.float32)

    def add(self, probs: np.ndarray, window: np.ndarray, row0: int, col0: int) -> None:
        """Add one tile's probabilities ``(C, T, T)`` whose top-left pixel is ``(row0, col0)``."""
        size_r, size_c = probs.shape[1:]
        r0, r1 = max(row0, self.rows.start), min(row0 + size_r, self.rows.stop)
        c0, c1 = max(col0, self.cols.start), min(col0 + size_c, self.cols.stop)
        if r0 >= r1 or c0 >= c1:
            return
        tile = (slice(r0 - row0, r1 - row0), slice(c0 - col0, c1 - col0))
        dest = (slice(r0 - self.rows.start, r1 - self.rows.start), slice(c0 - self.cols.start, c1 - self.cols.start))
        w = window[tile]
        self.sum[(slice(None), *dest)] += probs[(slice(None), *tile)] * w
        self.weight[dest] += w

    def finalize(self, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Classes (uint8, 255 nodata) and confidence (uint8 percent) where ``valid``."""
        return finalize(self.sum, self.weight, valid)


def finalize(acc: np.ndarray, weight: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    classes = acc.argmax(axis=0).astype(np.uint8)
    best = np.take_along_axis(acc, classes[None].astype(np.intp), axis=0)[0]
    covered = valid & (weight > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.where(covered, np.rint(100.0 * best / weight), 0).clip(0, 100).astype(np.uint8)
    classes[~covered] = NODATA
    return classes, confidence
