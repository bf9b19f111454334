import itertools

import numpy as np
import pytest

from geoseg.blending import support
from geoseg.tiling import (
    Span,
    TileGrid,
    axis_ownership,
    iter_blocks,
    level_chunks,
    overlap_cost,
    reaching_blocks,
    row_bands,
    tile_owner,
)


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


def test_row_bands_of_a_block_follow_the_files_block_rows():
    # a 1024 block's read span with tile 256 / overlap 32, in a file of 256-row blocks
    assert row_bands(Span(-16, 1136), 256) == [Span(-16, 0)] + [Span(k, k + 256) for k in range(0, 1024, 256)] + [
        Span(1024, 1136)
    ]


@pytest.mark.parametrize(
    ("rows", "height", "offset"),
    [(Span(1104, 2272), 256, 112), (Span(5, 40), 512, 0), (Span(0, 300), 133, 7), (Span(-300, -10), 64, -5)],
)
def test_row_bands_cover_the_span_and_cut_only_between_block_rows(rows, height, offset):
    bands = row_bands(rows, height, offset)
    assert bands[0].start == rows.start and bands[-1].stop == rows.stop
    assert all(a.stop == b.start for a, b in itertools.pairwise(bands))  # contiguous, no row twice
    assert all((b.start - offset) % height == 0 for b in bands[1:])  # cuts on block rows only
    assert all(0 < b.size <= height for b in bands)
    # each band lies within one row of blocks: no block is decoded for two bands
    assert all((b.start - offset) // height == (b.stop - 1 - offset) // height for b in bands)


def test_blocks_cover_the_grid_once():
    seen = np.zeros((700, 1000), int)
    for b in iter_blocks(700, 1000, 256):
        seen[b.rows.start : b.rows.stop, b.cols.start : b.cols.stop] += 1
    assert (seen == 1).all()


CASES = [
    # tile, overlap, blend, axis length, block size
    (256, 32, "gaussian", 4096, 2048),
    (128, 16, "gaussian", 1000, 256),
    (128, 16, "gaussian", 1000, 100),  # blocks smaller than a tile
    (128, 16, "trim", 700, 128),
    (64, 0, "cosine", 333, 50),
]


@pytest.mark.parametrize(("tile", "overlap", "blend", "length", "block"), CASES)
def test_every_tile_has_exactly_one_owner(tile, overlap, blend, length, block):
    grid = TileGrid(tile, overlap)
    sup = support(blend, grid)
    n_blocks = -(-length // block)
    owned = [i for k in range(n_blocks) for i in axis_ownership(grid, k, block, length, sup).owned]
    assert owned == list(range(grid.count(length)))
    assert all(
        tile_owner(grid, i, block, length) == k
        for k in range(n_blocks)
        for i in axis_ownership(grid, k, block, length, sup).owned
    )


@pytest.mark.parametrize(("tile", "overlap", "blend", "length", "block"), CASES)
def test_interior_is_what_no_other_block_reaches(tile, overlap, blend, length, block):
    """Brute force over pixels: which blocks' tiles reach each one."""
    grid = TileGrid(tile, overlap)
    sup = support(blend, grid)
    n_blocks = -(-length // block)
    reached_by = [set() for _ in range(length)]
    for i in range(grid.count(length)):
        lo, hi = max(0, grid.origin(i) + sup.start), min(length, grid.origin(i) + sup.stop)
        for x in range(lo, hi):
            reached_by[x].add(tile_owner(grid, i, block, length))
    for k in range(n_blocks):
        own = axis_ownership(grid, k, block, length, sup)
        span = range(k * block, min((k + 1) * block, length))
        assert [x for x in span if reached_by[x] == {k}] == list(range(own.interior.start, own.interior.stop))
        assert [x for x in range(length) if k in reached_by[x]] == list(range(own.extent.start, own.extent.stop))
        reaching = {b for x in span for b in reached_by[x]}
        assert set(reaching_blocks(grid, k, block, length, sup)) == reaching


def test_overlap_cost_is_the_overlap_alone_for_any_block_size():
    grid = TileGrid(256, 32)
    # each tile is computed once, by its owner: blocks add no duplicates
    for block in (4096, 2048, 512):
        assert overlap_cost(4096, 4096, block, grid) == pytest.approx(19 * 19 / 16**2)


def test_invalid_overlap_is_refused():
    with pytest.raises(ValueError):
        TileGrid(128, 70)
    with pytest.raises(ValueError):
        TileGrid(128, 15)


@pytest.mark.parametrize(
    ("height", "width", "block", "factor"), [(1000, 700, 128, 2), (1000, 700, 128, 4), (300, 2000, 256, 8)]
)
def test_each_block_is_in_one_overview_chunk_whose_region_holds_its_windows(height, width, block, factor):
    blocks = list(iter_blocks(height, width, block))
    chunks = level_chunks(blocks, factor)
    assert sorted(b.key for members in chunks.values() for b in members) == sorted(b.key for b in blocks)
    for (i, j), members in chunks.items():
        assert len(members) <= factor * factor
        for b in members:  # its window on the level lies inside the chunk's block-sized region
            r0, c0 = b.rows.start // factor, b.cols.start // factor
            r1, c1 = -(-b.rows.stop // factor), -(-b.cols.stop // factor)
            assert i * block <= r0 and r1 <= (i + 1) * block and j * block <= c0 and c1 <= (j + 1) * block
