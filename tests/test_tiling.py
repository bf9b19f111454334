import numpy as np
import pytest

from geoseg.blending import support
from geoseg.tiling import Span, TileGrid, iter_blocks, overlap_cost


@pytest.mark.parametrize(("tile", "overlap"), [(128, 16), (256, 32), (64, 0)])
def test_tile_cores_partition_the_axis(tile, overlap):
    grid = TileGrid(tile, overlap)
    length = 1000
    hits = np.zeros(length, int)
    for i in range(grid.count(length)):
        core0 = grid.origin(i) + grid.half_overlap
        hits[max(core0, 0) : min(core0 + grid.stride, length)] += 1
    assert (hits == 1).all()


def test_tiles_touching_a_block_are_exactly_those_that_overlap_it():
    grid = TileGrid(128, 16)
    length = 1000
    for block in (Span(0, 256), Span(256, 512), Span(768, 1000), Span(0, 1000)):
        got = set(grid.indices_touching(block, length))
        want = {
            i
            for i in range(grid.count(length))
            if grid.origin(i) < block.stop and grid.origin(i) + grid.tile_size > block.start
        }
        assert got == want


def test_trim_support_needs_only_tiles_whose_core_meets_the_block():
    grid = TileGrid(128, 16)
    core = support("trim", grid)
    idx = grid.indices_touching(Span(112, 224), 1000, core)
    assert list(idx) == [1]  # stride 112: the block is tile 1's core exactly


def test_read_span_covers_the_tiles():
    grid = TileGrid(128, 16)
    span = grid.read_span(range(2, 5))
    assert span == Span(2 * 112 - 8, 4 * 112 - 8 + 128)


def test_blocks_cover_the_grid_once():
    seen = np.zeros((700, 1000), int)
    for b in iter_blocks(700, 1000, 256):
        seen[b.rows.start : b.rows.stop, b.cols.start : b.cols.stop] += 1
    assert (seen == 1).all()


def test_overlap_cost_grows_with_smaller_blocks():
    grid = TileGrid(256, 32)
    big = overlap_cost(4096, 4096, 4096, grid)
    small = overlap_cost(4096, 4096, 512, grid)
    assert 1.0 < big < small
    # one block holding the whole scene computes each tile once: the cost is the overlap's alone
    assert big == pytest.approx(19 * 19 / 16**2)


def test_invalid_overlap_is_refused():
    with pytest.raises(ValueError):
        TileGrid(128, 70)
    with pytest.raises(ValueError):
        TileGrid(128, 15)
