"""Change between two class maps on one grid: pure numpy.

A pixel is *changed* when both dates are valid, their classes differ, both confidences reach
``min_confidence``, and its 4-connected change region has at least ``mmu_pixels`` pixels.
Pixels where either date is nodata are nodata, never change.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from geoseg.blending import NODATA
from geoseg.vectorize import FOUR_CONNECTED

MAX_CLASSES = 15  # transition codes from * K + to must stay below the nodata value 255


@dataclass
class ChangeBlock:
    from_class: np.ndarray  # uint8, 255 nodata
    to_class: np.ndarray  # uint8, 255 nodata
    changed: np.ndarray  # uint8 0/1, 255 nodata
    transition: np.ndarray  # uint8 from*K + to (to = from where unchanged), 255 nodata


def drop_small_regions(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    """``mask`` without its 4-connected regions smaller than ``min_pixels``.

    Read with a halo of ``min_pixels``, a block gets the whole mosaic's answer: a smaller
    region fits in the halo, a larger one shows at least ``min_pixels`` pixels inside it.
    """
    if min_pixels <= 1 or not mask.any():
        return mask
    labels, _ = ndimage.label(mask, structure=FOUR_CONNECTED)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_pixels
    keep[0] = False
    return keep[labels]


def detect_change(
    from_class: np.ndarray,
    to_class: np.ndarray,
    from_conf: np.ndarray,
    to_conf: np.ndarray,
    n_classes: int,
    min_confidence: int = 0,
    mmu_pixels: int = 0,
) -> ChangeBlock:
    if n_classes > MAX_CLASSES:
        raise ValueError(f"change detection supports up to {MAX_CLASSES} classes, got {n_classes}")
    valid = (from_class != NODATA) & (to_class != NODATA)
    confident = (from_conf >= min_confidence) & (to_conf >= min_confidence)
    changed = drop_small_regions(valid & confident & (from_class != to_class), mmu_pixels)
    effective_to = np.where(changed, to_class, from_class)
    transition = np.where(valid, from_class.astype(np.int32) * n_classes + effective_to, NODATA).astype(np.uint8)
    return ChangeBlock(
        from_class=np.where(valid, from_class, NODATA).astype(np.uint8),
        to_class=np.where(valid, to_class, NODATA).astype(np.uint8),
        changed=np.where(valid, changed, NODATA).astype(np.uint8),
        transition=transition,
    )


def transition_matrix(transition: np.ndarray, n_classes: int) -> np.ndarray:
    """``m[f, t]``: valid pixels that went from class f to class t (unchanged ones on the diagonal)."""
    codes = transition[transition != NODATA].astype(np.int64)
    return np.bincount(codes, minlength=n_classes * n_classes)[: n_classes * n_classes].reshape(n_classes, n_classes)


def changed_codes(block: ChangeBlock) -> np.ndarray:
    """Transition codes where changed, nodata elsewhere: the raster change polygons are made from."""
    return np.where(block.changed == 1, block.transition, NODATA).astype(np.uint8)
