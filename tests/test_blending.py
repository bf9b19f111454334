import numpy as np
import pytest
import torch

from geoseg.blending import FIXED_ONE, NODATA, Accumulator, finalize, fixed_votes, fixed_window, window_2d
from geoseg.device_blending import DeviceAccumulator, finalize_tensor
from geoseg.tiling import Span, TileGrid

MODES = ["gaussian", "cosine", "trim"]


def blend_all(probs_of, n_classes: int, size: int, grid: TileGrid, mode: str, order=None) -> Accumulator:
    """Accumulate every tile (``probs_of((i, j))``) over a ``size`` square, in ``order`` (default row-major)."""
    w = fixed_window(mode, grid.tile_size, grid.overlap)
    acc = Accumulator(n_classes, Span(0, size), Span(0, size))
    n = grid.count(size)
    tiles = [(i, j) for i in range(n) for j in range(n)]
    for i, j in order(tiles) if order else tiles:
        acc.add(fixed_votes(probs_of((i, j)), w), w, grid.origin(i), grid.origin(j))
    return acc


@pytest.mark.parametrize("mode", MODES)
def test_summed_weights_cover_every_pixel(mode):
    acc = blend_all(lambda ij: np.ones((1, 64, 64), np.float32), 1, 200, TileGrid(64, 16), mode)
    assert (acc.weight > 0).all()
    # with probabilities identically 1 the class votes are exactly the weight
    np.testing.assert_array_equal(acc.sums[0], acc.weight)


@pytest.mark.parametrize("mode", MODES)
def test_constant_model_gives_constant_output(mode):
    probs = np.array([0.1, 0.7, 0.2], np.float32)[:, None, None] * np.ones((3, 64, 64), np.float32)
    acc = blend_all(lambda ij: probs, 3, 150, TileGrid(64, 16), mode)
    classes, confidence = acc.finalize()
    assert (classes == 1).all()
    assert (confidence == 70).all()


def test_sum_does_not_depend_on_tile_order():
    """Fixed point makes the blend exact: any order of the tiles gives the same integers."""
    rng = np.random.default_rng(1)
    grid = TileGrid(64, 16)
    probs = {
        (i, j): rng.dirichlet(np.ones(5), (64, 64)).transpose(2, 0, 1).astype(np.float32)
        for i in range(grid.count(200))
        for j in range(grid.count(200))
    }
    forward = blend_all(probs.__getitem__, 5, 200, grid, "gaussian")
    backward = blend_all(probs.__getitem__, 5, 200, grid, "gaussian", order=lambda t: t[::-1])
    shuffled = blend_all(
        probs.__getitem__, 5, 200, grid, "gaussian", order=lambda t: [t[k] for k in rng.permutation(len(t))]
    )
    np.testing.assert_array_equal(forward.sums, backward.sums)
    np.testing.assert_array_equal(forward.sums, shuffled.sums)
    # and it is the float blend to within the fixed point's resolution
    w = window_2d("gaussian", 64, 16)
    ref = np.zeros((5, 200, 200))
    ref_w = np.zeros((200, 200))
    for (i, j), p in probs.items():
        r0, c0 = grid.origin(i), grid.origin(j)
        rs, cs = slice(max(r0, 0), min(r0 + 64, 200)), slice(max(c0, 0), min(c0 + 64, 200))
        ts = (slice(rs.start - r0, rs.stop - r0), slice(cs.start - c0, cs.stop - c0))
        ref[:, rs, cs] += p[(slice(None), *ts)] * w[ts]
        ref_w[rs, cs] += w[ts]
    np.testing.assert_allclose(forward.sums[:5] / FIXED_ONE, ref, atol=4e-6)
    np.testing.assert_allclose(forward.weight / FIXED_ONE, ref_w, atol=4e-6)


def test_trim_reproduces_tile_centres():
    grid = TileGrid(64, 16)
    rng = np.random.default_rng(0)
    probs = {
        (i, j): rng.random((4, 64, 64)).astype(np.float32)
        for i in range(grid.count(160))
        for j in range(grid.count(160))
    }
    truth = np.full((160, 160), -1)
    for (i, j), p in probs.items():
        # the tile's own argmax in its core is what trim must keep
        r0, c0 = i * grid.stride, j * grid.stride
        core = p[:, 8 : 8 + grid.stride, 8 : 8 + grid.stride].argmax(0)
        h, wd = truth[r0 : r0 + grid.stride, c0 : c0 + grid.stride].shape
        truth[r0 : r0 + h, c0 : c0 + wd] = core[:h, :wd]
    classes, _ = blend_all(probs.__getitem__, 4, 160, grid, "trim").finalize()
    np.testing.assert_array_equal(classes, truth)


def test_invalid_pixels_are_nodata_never_class_zero():
    acc = Accumulator(2, Span(0, 10), Span(0, 10))
    window = np.full((10, 10), FIXED_ONE, np.int32)
    votes = fixed_votes(np.stack([np.ones((10, 10)), np.zeros((10, 10))]).astype(np.float32), window)
    valid = np.ones((10, 10), bool)
    valid[:, :3] = False
    acc.add(votes, window, 0, 0, valid)
    classes, confidence = acc.finalize()
    assert (classes[:, :3] == NODATA).all() and (classes[:, 3:] == 0).all()
    assert (confidence[:, :3] == 0).all() and (confidence[:, 3:] == 100).all()


def test_uncovered_pixels_are_nodata():
    acc = Accumulator(2, Span(0, 10), Span(0, 10))
    classes, _ = acc.finalize()
    assert (classes == NODATA).all()


def test_sums_of_another_accumulator_add_where_they_overlap():
    a = Accumulator(1, Span(0, 10), Span(0, 10))
    b = Accumulator(1, Span(5, 15), Span(-5, 5))
    b.sums[:] = 3
    a.add_sums(b.sums, b.rows, b.cols)
    assert (a.sums[:, 5:, :5] == 3).all() and a.sums.sum() == 3 * 2 * 25
    np.testing.assert_array_equal(a.region(Span(5, 10), Span(0, 5)), b.sums[:, :5, 5:])


def test_windows_are_symmetric_and_positive_on_support():
    for mode in ("gaussian", "cosine"):
        w = window_2d(mode, 64, 16)
        assert (w > 0).all() and (fixed_window(mode, 64, 16) >= 1).all()
        np.testing.assert_allclose(w, w[::-1, ::-1])
    trim = window_2d("trim", 64, 16)
    assert trim[8:56, 8:56].min() == 1 and trim[:8].max() == 0
    assert fixed_window("trim", 64, 16)[8:56, 8:56].min() == FIXED_ONE


def test_device_accumulator_is_bitwise_the_host_one():
    """The torch accumulator (here on the CPU device; a GPU runs the same operations) adds the
    same integers and makes the same argmax, ties and confidence as the numpy one: tiles
    clipped at the edges, tiles with invalid pixels, classes that tie, pixels no tile covers."""
    rng = np.random.default_rng(3)
    grid, k = TileGrid(64, 16), 4
    w = fixed_window("gaussian", 64, 16)
    rows, cols = Span(-8, 150), Span(20, 170)
    host = Accumulator(k, rows, cols)
    device = DeviceAccumulator(k, rows, cols, torch.device("cpu"))
    for i in range(grid.count(150)):
        for j in range(grid.count(190)):
            probs = rng.dirichlet(np.ones(k), (64, 64)).transpose(2, 0, 1).astype(np.float32)
            if (i + j) % 3 == 0:  # exact ties between classes 1 and 2: the lower one wins
                probs[1] = probs[2] = np.float32(0.4)
                probs[0] = probs[3] = np.float32(0.1)
            valid = rng.random((64, 64)) > 0.2 if (i * j) % 4 == 1 else None
            votes = fixed_votes(probs, w)
            host.add(votes, w, grid.origin(i), grid.origin(j), valid)
            device.add(torch.from_numpy(votes), w, grid.origin(i), grid.origin(j), valid)
    np.testing.assert_array_equal(device.sums.numpy(), host.sums)
    region = (Span(0, 100), Span(60, 170))
    np.testing.assert_array_equal(device.region(*region), host.region(*region))
    classes, confidence = host.finalize(*region)
    got_classes, got_confidence = device.finalize(*region)
    np.testing.assert_array_equal(got_classes, classes)
    np.testing.assert_array_equal(got_confidence, confidence)
    assert {0, 1, 2, 3, NODATA} <= set(np.unique(host.finalize()[0]))  # ties, invalid pixels: all there
    np.testing.assert_array_equal(device.finalize()[0], host.finalize()[0])


def test_device_confidence_rounds_halves_to_even_like_the_host():
    """Shares of exactly 12.5 % and 37.5 % (halves after x100) round to 12 and 38 on both."""
    weight = np.full((1, 2), 8 * 1024, np.int32)
    votes = np.zeros((3, 1, 2), np.int32)
    votes[0, 0, 0], votes[1, 0, 0] = 1024, 1024  # best share 1/8 (a tie: class 0)
    votes[2, 0, 1] = 3 * 1024  # best share 3/8
    classes, confidence = finalize(votes, weight)
    assert classes.tolist() == [[0, 2]] and confidence.tolist() == [[12, 38]]
    got = finalize_tensor(torch.from_numpy(votes), torch.from_numpy(weight))
    assert got[0].tolist() == [[0, 2]] and got[1].tolist() == [[12, 38]]
