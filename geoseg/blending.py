"""Blending windows and the weighted accumulation of tile predictions: pure numpy.

A pixel's class is the argmax of ``sum_t w_t * p_t / sum_t w_t`` over the tiles ``t`` that
cover it, where ``p_t`` are softmax probabilities and ``w_t`` the tile's window. The terms are
fixed-point integers (``FIXED_ONE`` = 1.0), so the sum is exact and the same in any order:
whichever block adds a tile, and whenever, the mosaic comes out bitwise the same.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import numpy as np

from geoseg.tiling import Span, TileGrid, relative_slices

BlendMode = Literal["gaussian", "cosine", "trim"]
NODATA = 255
FIXED_ONE = 1 << 24  # fixed-point 1.0: 2**-24 resolution, like float32 near 1


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


@lru_cache(maxsize=8)
def fixed_window(mode: BlendMode, tile_size: int, overlap: int) -> np.ndarray:
    """The window in fixed point (int32, 1.0 = ``FIXED_ONE``), at least 1 wherever it is positive;
    computed once per (mode, tile, overlap) and shared read-only."""
    w = window_2d(mode, tile_size, overlap)
    out = np.where(w > 0, np.maximum(np.rint(w.astype(np.float64) * FIXED_ONE), 1), 0).astype(np.int32)
    out.setflags(write=False)
    return out


def fixed_votes(probs: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Probabilities ``(..., K, T, T)`` times a fixed-point window, truncated to int32 (what tiles add)."""
    return (probs * window.astype(np.float32)).astype(np.int32)


class Accumulator:
    """Weighted class votes over a window of the output grid, in fixed point.

    Channels ``0..K-1`` sum each class's votes (probability x window), channel ``K`` the window
    weight of valid pixels. Integer sums do not depend on the order of the terms, so a block
    can add its neighbours' contributions whenever they arrive and the mosaic stays bitwise
    identical for any partition. At most 2 x 2 tiles cover a pixel (overlap < tile/2), so
    ``4 * FIXED_ONE`` bounds every sum and int32 cannot overflow.
    """

    def __init__(self, n_classes: int, rows: Span, cols: Span) -> None:
        self.rows, self.cols = rows, cols
        self.n_classes = n_classes
        self.sums = np.zeros((n_classes + 1, rows.size, cols.size), dtype=np.int32)

    @property
    def weight(self) -> np.ndarray:
        return self.sums[self.n_classes]

    def add(self, votes: np.ndarray, window: np.ndarray, row0: int, col0: int, valid: np.ndarray | None = None) -> None:
        """Add one tile's ``votes`` (K, T, T) with top-left pixel ``(row0, col0)``; ``window`` is the
        fixed-point window, counted only where ``valid`` (pixels outside the scene stay nodata)."""
        size_r, size_c = votes.shape[1:]
        dest, src = overlap_slices(self.rows, self.cols, Span(row0, row0 + size_r), Span(col0, col0 + size_c))
        if dest is None:
            return
        self.sums[(slice(0, self.n_classes), *dest)] += votes[(slice(None), *src)]
        weight = window[src] if valid is None else np.where(valid[src], window[src], 0)
        self.sums[(self.n_classes, *dest)] += weight

    def add_sums(self, sums: np.ndarray, rows: Span, cols: Span) -> None:
        """Add another accumulator's sums ``(K+1, h, w)`` covering ``rows`` x ``cols`` (where they overlap)."""
        dest, src = overlap_slices(self.rows, self.cols, rows, cols)
        if dest is not None:
            self.sums[(slice(None), *dest)] += sums[(slice(None), *src)]

    def region(self, rows: Span, cols: Span) -> np.ndarray:
        """A view of the sums over ``rows`` x ``cols`` (inside the accumulator)."""
        return self.sums[(slice(None), *relative_slices(self.rows, self.cols, rows, cols))]

    def finalize(self, rows: Span | None = None, cols: Span | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Classes (uint8, 255 nodata) and confidence (uint8 percent) over ``rows`` x ``cols`` (default: all)."""
        sums = self.sums if rows is None or cols is None else self.region(rows, cols)
        return finalize(sums[: self.n_classes], sums[self.n_classes])


def overlap_slices(
    rows: Span, cols: Span, src_rows: Span, src_cols: Span
) -> tuple[tuple[slice, slice] | None, tuple[slice, slice]]:
    """Slices of the overlap of ``src`` with ``rows`` x ``cols``: in the destination and in the source."""
    r0, r1 = max(src_rows.start, rows.start), min(src_rows.stop, rows.stop)
    c0, c1 = max(src_cols.start, cols.start), min(src_cols.stop, cols.stop)
    if r0 >= r1 or c0 >= c1:
        return None, (slice(0, 0), slice(0, 0))
    dest = (slice(r0 - rows.start, r1 - rows.start), slice(c0 - cols.start, c1 - cols.start))
    src = (slice(r0 - src_rows.start, r1 - src_rows.start), slice(c0 - src_cols.start, c1 - src_cols.start))
    return dest, src


def finalize(votes: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Argmax class and its share of the weight; pixels without weight (uncovered or invalid) are nodata.

    A running maximum over the classes (ties: the lower class, as ``argmax``) makes K passes
    over contiguous planes, several times faster than ``argmax(axis=0)`` on a (K, H, W) array.
    """
    classes = np.zeros(weight.shape, dtype=np.uint8)
    best = votes[0].copy()
    for k in range(1, votes.shape[0]):
        np.copyto(classes, k, where=votes[k] > best)
        np.maximum(best, votes[k], out=best)
    covered = weight > 0
    share = np.zeros(weight.shape, dtype=np.float32)
    np.divide(best, weight, out=share, where=covered, dtype=np.float32)
    share *= 100.0
    confidence = np.rint(share, out=share).clip(0, 100).astype(np.uint8)
    classes[~covered] = NODATA
    return classes, confidence
