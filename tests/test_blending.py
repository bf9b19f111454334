import numpy as np
import pytest

from geoseg.blending import NODATA, Accumulator, window_2d
from geoseg.tiling import Span, TileGrid

MODES = ["gaussian", "cosine", "trim"]


@pytest.mark.parametrize("mode", MODES)
def test_summed_weights_cover_every_pixel(mode):
    grid = TileGrid(64, 16)
    w = window_2d(mode, 64, 16)
    acc = Accumulator(1, Span(0, 200), Span(0, 200))
    n = grid.count(200)
    for i in range(n):
        for j in range(n):
            acc.add(np.ones((1, 64, 64), np.float32), w, grid.origin(i), grid.origin(j))
    assert (acc.weight > 0).all()
    # with probabilities identically 1 the normalised sum is exactly the weight sum
    np.testing.assert_allclose(acc.sum[0], acc.weight, rtol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_constant_model_gives_constant_output(mode):
    grid = TileGrid(64, 16)
    w = window_2d(mode, 64, 16)
    probs = np.array([0.1, 0.7, 0.2], np.float32)[:, None, None] * np.ones((3, 64, 64), np.float32)
    acc = Accumulator(3, Span(0, 150), Span(0, 150))
    for i in range(grid.count(150)):
        for j in range(grid.count(150)):
            acc.add(probs, w, grid.origin(i), grid.origin(j))
    classes, confidence = acc.finalize(np.ones((150, 150), bool))
    assert (classes == 1).all()
    assert (confidence == 70).all()


def test_trim_reproduces_tile_centres():
    grid = TileGrid(64, 16)
    w = window_2d("trim", 64, 16)
    rng = np.random.default_rng(0)
    n = grid.count(160)
    truth = np.full((160, 160), -1)
    acc = Accumulator(4, Span(0, 160), Span(0, 160))
    for i in range(n):
        for j in range(n):
            probs = rng.random((4, 64, 64)).astype(np.float32)
            acc.add(probs, w, grid.origin(i), grid.origin(j))
            # the tile's own argmax in its core is what trim must keep
            r0, c0 = i * grid.stride, j * grid.stride
            core = probs[:, 8 : 8 + grid.stride, 8 : 8 + grid.stride].argmax(0)
            h, wd = truth[r0 : r0 + grid.stride, c0 : c0 + grid.stride].shape
            truth[r0 : r0 + h, c0 : c0 + wd] = core[:h, :wd]
    classes, _ = acc.finalize(np.ones((160, 160), bool))
    np.testing.assert_array_equal(classes, truth)


def test_invalid_pixels_are_nodata_never_class_zero():
    acc = Accumulator(2, Span(0, 10), Span(0, 10))
    acc.add(np.stack([np.ones((10, 10)), np.zeros((10, 10))]).astype(np.float32), np.ones((10, 10), np.float32), 0, 0)
    valid = np.ones((10, 10), bool)
    valid[:, :3] = False
    classes, confidence = acc.finalize(valid)
    assert (classes[:, :3] == NODATA).all() and (classes[:, 3:] == 0).all()
    assert (confidence[:, :3] == 0).all()


def test_uncovered_pixels_are_nodata():
    acc = Accumulator(2, Span(0, 10), Span(0, 10))
    classes, _ = acc.finalize(np.ones((10, 10), bool))
    assert (classes == NODATA).all()


def test_windows_are_symmetric_and_positive_on_support():
    for mode in ("gaussian", "cosine"):
        w = window_2d(mode, 64, 16)
        assert (w > 0).all()
        np.testing.assert_allclose(w, w[::-1, ::-1])
    trim = window_2d("trim", 64, 16)
    assert trim[8:56, 8:56].min() == 1 and trim[:8].max() == 0
