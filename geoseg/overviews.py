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

    Each class's pixel count per window, the valid pixels' count and their confidence sum all
    add up from one level to the next (2 x 2 windows of the level below), so the levels are
    exact, and made from one comparison per class at full resolution.
    """
    if not factors:
        return {}
    top = max(factors)
    h, w = classes.shape
    rows, cols = -(-h // top) * top, -(-w // top) * top
    padded = np.full((rows, cols), NODATA, dtype=np.uint8)
    padded[:h, :w] = classes
    valid = padded != NODATA
    conf = np.zeros((rows, cols), dtype=np.int32)
    conf[:h, :w] = confidence
    values = [int(v) for v in np.unique(classes) if v != NODATA]
    counts = [_halve(padded == v) for v in values]
    n_valid, conf_sum = _halve(valid), _halve(np.where(valid, conf, 0))
    out = {}
    factor = 2
    while True:
        if factor in factors:
            size = (-(-h // factor), -(-w // factor))
            best = np.full(n_valid.shape, NODATA, dtype=np.uint8)
            best_count = np.zeros(n_valid.shape, dtype=np.int32)
            for value, count in zip(values, counts, strict=True):
                more = count > best_count  # classes in increasing order: a tie keeps the lower one
                best[more], best_count[more] = value, count[more]
            mean = np.where(n_valid > 0, np.round(conf_sum / np.maximum(n_valid, 1)), 0).astype(np.uint8)
            out[factor] = (best[: size[0], : size[1]], mean[: size[0], : size[1]])
        if factor == top:
            return out
        counts = [_halve(c) for c in counts]
        n_valid, conf_sum = _halve(n_valid), _halve(conf_sum)
        factor *= 2


def _halve(array: np.ndarray) -> np.ndarray:
    """Sums over 2 x 2 windows (int32): pairs of rows first, which keeps the reads contiguous."""
    if array.dtype == bool:
        array = array.view(np.uint8).astype(np.uint16)
    rows = array[0::2] + array[1::2]
    return (rows[:, 0::2] + rows[:, 1::2]).astype(np.int32, copy=False)
