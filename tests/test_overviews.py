"""Overview levels made block by block equal the levels of the whole mosaic."""

from __future__ import annotations

import numpy as np
import pytest

from geoseg.overviews import downsample, levels, overview_factors
from geoseg.synth import SceneSpec, make_labels
from geoseg.tiling import iter_blocks


def test_factors_divide_the_block_and_stop_at_the_overview_size():
    assert overview_factors(4096, 3000, 1024) == [2, 4, 8, 16]  # 4096 / 16 = 256
    assert overview_factors(4096, 3000, 256) == [2, 4, 8, 16]
    assert overview_factors(4096, 3000, 72) == [2, 4, 8]  # 16 does not divide 72
    assert overview_factors(200, 300, 1024) == [2]  # 300 px > 256: one level
    assert overview_factors(256, 256, 1024) == []


def test_mode_ties_go_to_the_lower_class_and_nodata_does_not_vote():
    classes = np.array([[3, 1, 255, 255], [1, 3, 255, 2]], dtype=np.uint8)
    confidence = np.array([[90, 70, 0, 0], [50, 30, 0, 81]], dtype=np.uint8)
    level_classes, level_confidence = downsample(classes, confidence, 2)
    assert level_classes.tolist() == [[1, 2]]  # a 2-2 tie between 1 and 3; one valid pixel of class 2
    assert level_confidence.tolist() == [[60, 81]]  # the mean over the valid pixels only
    empty_classes, empty_confidence = downsample(np.full((2, 2), 255, np.uint8), np.zeros((2, 2), np.uint8), 2)
    assert empty_classes.tolist() == [[255]] and empty_confidence.tolist() == [[0]]


@pytest.mark.parametrize("block_size", [64, 128])
def test_levels_made_block_by_block_equal_the_whole_mosaics(block_size):
    classes = make_labels(SceneSpec(390, 300, seed=9))  # sides that are not multiples of the block
    classes[:30, :50] = 255
    confidence = (np.arange(classes.size).reshape(classes.shape) * 13 % 101).astype(np.uint8)
    h, w = classes.shape
    for factor in (2, 4, 8, 64):
        if block_size % factor:
            continue
        want = downsample(classes, confidence, factor)
        got = [np.full(want[0].shape, 7, np.uint8), np.full(want[1].shape, 7, np.uint8)]
        for b in iter_blocks(h, w, block_size):
            part = downsample(
                classes[b.rows.start : b.rows.stop, b.cols.start : b.cols.stop],
                confidence[b.rows.start : b.rows.stop, b.cols.start : b.cols.stop],
                factor,
            )
            r, c = b.rows.start // factor, b.cols.start // factor
            for level, data in zip(got, part, strict=True):
                level[r : r + data.shape[0], c : c + data.shape[1]] = data
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    # the oracle itself, at factor 2 on one window: the most frequent valid class
    window = classes[100:102, 200:202].ravel()
    values, counts = np.unique(window[window != 255], return_counts=True)
    assert downsample(classes, confidence, 2)[0][50, 100] == values[np.argmax(counts)]


def test_every_window_of_random_blocks_gets_its_mode_and_rounded_mean():
    """Against each window on its own: the most frequent valid class (the lower one of a tie),
    and the mean confidence rounded as numpy rounds (half to even), at every level."""
    rng = np.random.default_rng(5)
    for _ in range(60):
        h, w = rng.integers(1, 40, 2)
        classes = rng.integers(0, rng.integers(1, 5), (h, w)).astype(np.uint8)
        classes[rng.random((h, w)) < rng.random() * 0.6] = 255
        confidence = rng.integers(0, 4, (h, w)).astype(np.uint8) * 85  # sums that often end in .5
        got = levels(classes, confidence, [2, 4, 8, 16])
        for factor, (level_classes, level_confidence) in got.items():
            assert level_classes.shape == (-(-h // factor), -(-w // factor))
            for (i, j), value in np.ndenumerate(level_classes):
                window = np.s_[i * factor : (i + 1) * factor, j * factor : (j + 1) * factor]
                valid = classes[window] != 255
                if not valid.any():
                    assert value == 255 and level_confidence[i, j] == 0
                    continue
                assert value == np.argmax(np.bincount(classes[window][valid]))
                assert level_confidence[i, j] == np.round(confidence[window][valid].astype(float).mean())
