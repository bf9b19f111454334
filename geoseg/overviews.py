"""Overview levels of the class mosaic, made one block at a time.

Level ``f`` (2, 4, 8, ...) has one pixel per ``f`` x ``f`` window of the mosaic: the classes by
mode (the class most of the window's valid pixels have; ties to the lower class; nodata where
the window has no valid pixel), the confidence by the mean over those valid pixels, rounded.
A window's value depends only on its own pixels, and every factor divides the block size, so
a block's windows are whole and the levels made block by block equal the levels of the whole
mosaic (tested against it). A level's chunks are a block's size: one holds the windows of
``f`` x ``f`` blocks and is written whole once they are final
(:func:`geoseg.blocks.overview_graph`), so each chunk has one writer and a level is a few
objects, not one per block.
"""

from __future__ import annotations

import numba
import numpy as np

from geoseg.blending import NODATA

OVERVIEW_SIZE = 256  # px: the coarsest level is the first whose longer side is at most this


def overview_factors(height: int, width: int, block_size: int) -> list[int]:
    """The levels' factors: powers of two that divide the block size (a block is then one chunk
    of every level), until the longer side is at most ``OVERVIEW_SIZE``."""
    factors: list[int] = []
    factor = 2
    while block_size % factor == 0 and max(height, width) > OVERVIEW_SIZE * factor // 2:
        factors.append(factor)
        factor *= 2
    return factors


def downsample(classes: np.ndarray, confidence: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """One level of a block: classes by mode, confidence by the mean of the valid pixels."""
    return levels(classes, confidence, [factor])[factor]


def levels(classes: np.ndarray, confidence: np.ndarray, factors: list[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Every level of ``factors`` (powers of two) of a block, from one pyramid of counts.

    Each class's pixel count per window and the valid pixels' confidence sum add up from one
    level to the next (2 x 2 windows of the level below), so the levels are exact; the first
    level's come from one pass over the block.
    """
    if not factors:
        return {}
    top = max(factors)
    h, w = classes.shape
    values, counts, conf_sum = _window_counts(
        np.ascontiguousarray(classes, dtype=np.uint8), np.ascontiguousarray(confidence, dtype=np.uint8), top
    )
    out = {}
    factor = 2
    while True:
        if factor in factors:
            best, mean = _mode_and_mean(values, counts, conf_sum)
            rows, cols = -(-h // factor), -(-w // factor)
            out[factor] = (best[:rows, :cols], mean[:rows, :cols])
        if factor == top:
            return out
        counts, conf_sum = _halve(counts), _halve(conf_sum)
        factor *= 2


@numba.njit(cache=True, nogil=True)
def _window_counts(classes: np.ndarray, confidence: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first level's counts, in one pass over the block padded to a multiple of ``top`` (the
    padding is nodata): the classes present (increasing), each one's pixel count per 2 x 2
    window (rows, columns, classes: a window's counts side by side), and the confidence sum
    of the window's valid pixels (int64: a coarse level's window can hold more than
    2**31 / 255 pixels)."""
    h, w = classes.shape
    rows, cols = -(-h // top) * top // 2, -(-w // top) * top // 2
    index = np.full(256, -1, np.int64)
    for i in range(h):
        for j in range(w):
            index[classes[i, j]] = 0
    index[NODATA] = -1
    values = np.flatnonzero(index == 0).astype(np.uint8)
    for k in range(len(values)):
        index[values[k]] = k
    counts = np.zeros((rows, cols, len(values)), np.int32)
    conf_sum = np.zeros((rows, cols, 1), np.int64)
    for i in range(h):
        for j in range(w):
            k = index[classes[i, j]]
            if k >= 0:
                counts[i >> 1, j >> 1, k] += 1
                conf_sum[i >> 1, j >> 1, 0] += confidence[i, j]
    return values, counts, conf_sum


@numba.njit(cache=True, nogil=True)
def _mode_and_mean(values: np.ndarray, counts: np.ndarray, conf_sum: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each window's class by mode (the first of the largest counts: classes are in increasing
    order, so a tie keeps the lower one; nodata without a valid pixel) and its confidence by the
    mean over the valid pixels, rounded half to even, as numpy rounds."""
    rows, cols, n = counts.shape
    best = np.full((rows, cols), NODATA, np.uint8)
    mean = np.zeros((rows, cols), np.uint8)
    for i in range(rows):
        for j in range(cols):
            total, most, mode = 0, 0, NODATA
            for k in range(n):
                count = counts[i, j, k]
                total += count
                if count > most:
                    most, mode = count, values[k]
            best[i, j] = mode
            if total:
                quotient = conf_sum[i, j, 0] // total
                twice_remainder = 2 * (conf_sum[i, j, 0] - quotient * total)
                mean[i, j] = quotient + (twice_remainder > total or (twice_remainder == total and quotient % 2 == 1))
    return best, mean


def _halve(array: np.ndarray) -> np.ndarray:
    """Sums over 2 x 2 windows of the first two axes: pairs of rows first, which keeps the reads contiguous."""
    rows = array[0::2] + array[1::2]
    return rows[:, 0::2] + rows[:, 1::2]
