"""The global tile grid and the output blocks: pure integer maths, no I/O.

Tiles are anchored to the output grid, never to a block, which is what makes the mosaic
independent of the block size (invariant 1 of DESIGN.md). Tile ``(i, j)`` covers rows
``[i*s - h, i*s - h + T)`` and columns likewise, with ``T`` the tile size, ``s = T - overlap``
the stride and ``h = overlap // 2``; its *core* ``[i*s, (i+1)*s)`` partitions the plane.

Each tile is computed once, by the block that holds its centre (its *owner*). A block's tiles
reach up to about ``T/2`` pixels into its neighbours; those contributions (the block's
*frame*) are summed by the neighbours when they finish. Pixels that no other block's tile
reaches form the block's *interior*, which the owner can finish on its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """A half-open pixel interval ``[start, stop)`` along one axis."""

    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    def overlaps(self, other: Span) -> bool:
        return self.start < other.stop and other.start < self.stop


@dataclass(frozen=True)
class Rect:
    """Rows x columns of the output grid."""

    rows: Span
    cols: Span

    @property
    def empty(self) -> bool:
        return self.rows.size <= 0 or self.cols.size <= 0

    def overlaps(self, other: Rect) -> bool:
        return self.rows.overlaps(other.rows) and self.cols.overlaps(other.cols)


def ring(outer: Rect, inner: Rect) -> list[Rect]:
    """``outer`` minus ``inner`` (inside it, or empty) as up to four non-empty rectangles."""
    if inner.empty:
        return [] if outer.empty else [outer]
    parts = [
        Rect(Span(outer.rows.start, inner.rows.start), outer.cols),
        Rect(Span(inner.rows.stop, outer.rows.stop), outer.cols),
        Rect(inner.rows, Span(outer.cols.start, inner.cols.start)),
        Rect(inner.rows, Span(inner.cols.stop, outer.cols.stop)),
    ]
    return [p for p in parts if not p.empty]


def relative_slices(outer_rows: Span, outer_cols: Span, rows: Span, cols: Span) -> tuple[slice, slice]:
    """Where ``rows`` x ``cols`` (inside the outer window) lie in an array covering ``outer_rows`` x ``outer_cols``."""
    return (
        slice(rows.start - outer_rows.start, rows.stop - outer_rows.start),
        slice(cols.start - outer_cols.start, cols.stop - outer_cols.start),
    )


@dataclass(frozen=True)
class Block:
    """One output block: a Zarr chunk of the mosaic, and one Dask task."""

    row: int
    col: int
    rows: Span
    cols: Span

    @property
    def key(self) -> str:
        return f"{self.row}_{self.col}"

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows.size, self.cols.size

    @property
    def region(self) -> tuple[slice, slice]:
        """The block's rows and columns as array slices of the whole grid."""
        return slice(self.rows.start, self.rows.stop), slice(self.cols.start, self.cols.stop)


@dataclass(frozen=True)
class TileGrid:
    tile_size: int
    overlap: int

    def __post_init__(self) -> None:
        if self.overlap < 0 or self.overlap % 2 or self.overlap >= self.tile_size // 2:
            raise ValueError(f"overlap must be even and in [0, tile_size/2), got {self.overlap}")

    @property
    def stride(self) -> int:
        return self.tile_size - self.overlap

    @property
    def half_overlap(self) -> int:
        return self.overlap // 2

    def origin(self, index: int) -> int:
        """First pixel (row or column) covered by tile ``index`` along one axis."""
        return index * self.stride - self.half_overlap

    def count(self, length: int) -> int:
        """Tiles along an axis of ``length`` pixels: enough cores to cover it."""
        return max(1, math.ceil(length / self.stride))

    def indices_touching(self, span: Span, length: int, support: Span | None = None) -> range:
        """Tile indices whose ``support`` (offsets within the tile with non-zero weight) meets ``span``.

        ``length`` is the full axis length, which bounds the indices to the grid's tiles.
        """
        lo, hi = (support.start, support.stop) if support else (0, self.tile_size)
        s, h = self.stride, self.half_overlap
        # tile i touches when i*s - h + lo < span.stop and i*s - h + hi > span.start
        first = math.floor((span.start + h - hi) / s) + 1
        last = math.ceil((span.stop + h - lo) / s) - 1
        return range(max(0, first), min(self.count(length) - 1, last) + 1)

    def read_span(self, indices: range) -> Span:
        """The pixels the tiles ``indices`` need read (block plus halo)."""
        return Span(self.origin(indices.start), self.origin(indices.stop - 1) + self.tile_size)


@dataclass(frozen=True)
class AxisOwnership:
    """What one block computes along one axis."""

    owned: range  # indices of the tiles whose centre lies in the block
    extent: Span  # pixels those tiles reach (their support), clipped to the axis
    interior: Span  # pixels of the block that no other block's tile reaches (may be empty)


def tile_owner(grid: TileGrid, index: int, block_size: int, length: int) -> int:
    """The block (index along the axis) that computes tile ``index``: the one holding its centre."""
    last_block = max(0, math.ceil(length / block_size) - 1)
    return min((index * grid.stride + grid.stride // 2) // block_size, last_block)


def owned_indices(grid: TileGrid, block_index: int, block_size: int, length: int) -> range:
    """Tiles whose owner is block ``block_index`` (a contiguous run, possibly empty)."""
    s, n = grid.stride, grid.count(length)
    last_block = max(0, math.ceil(length / block_size) - 1)
    # tile i is owned by block k when k*B <= i*s + s//2 < (k+1)*B (the last block takes the rest)
    first = 0 if block_index == 0 else math.ceil((block_index * block_size - s // 2) / s)
    stop = n if block_index >= last_block else math.ceil(((block_index + 1) * block_size - s // 2) / s)
    return range(min(first, n), min(stop, n))


def axis_ownership(grid: TileGrid, block_index: int, block_size: int, length: int, support: Span) -> AxisOwnership:
    """Owned tiles, their extent and the interior of block ``block_index`` along one axis."""
    span = Span(block_index * block_size, min((block_index + 1) * block_size, length))
    owned = owned_indices(grid, block_index, block_size, length)
    if not owned:
        return AxisOwnership(owned, Span(span.start, span.start), Span(span.start, span.start))
    first, last = owned.start, owned.stop - 1
    extent = Span(max(0, grid.origin(first) + support.start), min(length, grid.origin(last) + support.stop))
    touching = grid.indices_touching(span, length, support)
    # the furthest reach of the neighbours' tiles into the block bounds its interior
    start = span.start if touching.start >= first else max(span.start, grid.origin(first - 1) + support.stop)
    stop = span.stop if touching.stop - 1 <= last else min(span.stop, grid.origin(last + 1) + support.start)
    return AxisOwnership(owned, extent, Span(start, max(start, stop)))


def reaching_blocks(grid: TileGrid, block_index: int, block_size: int, length: int, support: Span) -> list[int]:
    """Blocks (along one axis) whose tiles reach block ``block_index``: usually itself and its neighbours."""
    span = Span(block_index * block_size, min((block_index + 1) * block_size, length))
    n_blocks = math.ceil(length / block_size)
    reach = math.ceil(grid.tile_size / block_size) + 1
    return [
        k
        for k in range(max(0, block_index - reach), min(n_blocks, block_index + reach + 1))
        if (e := axis_ownership(grid, k, block_size, length, support).extent).start < span.stop and e.stop > span.start
    ]


def iter_blocks(height: int, width: int, block_size: int) -> Iterator[Block]:
    """Output blocks in row-major order; edge blocks are clipped to the grid."""
    for r, r0 in enumerate(range(0, height, block_size)):
        for c, c0 in enumerate(range(0, width, block_size)):
            yield Block(r, c, Span(r0, min(r0 + block_size, height)), Span(c0, min(c0 + block_size, width)))


def level_chunks(blocks: Iterable[Block], factor: int) -> dict[tuple[int, int], list[Block]]:
    """The blocks each chunk of an overview level holds, by the chunk's (row, col), in row-major
    order. A level's chunk is a block's size, so chunk (i, j) holds the windows of the
    ``factor`` x ``factor`` blocks with ``row // factor == i`` and ``col // factor == j``: every
    block is in exactly one chunk of each level."""
    chunks: dict[tuple[int, int], list[Block]] = {}
    for b in sorted(blocks, key=lambda b: (b.row, b.col)):
        chunks.setdefault((b.row // factor, b.col // factor), []).append(b)
    return dict(sorted(chunks.items()))


def overlap_cost(height: int, width: int, block_size: int, grid: TileGrid) -> float:
    """Tiles computed by all blocks / tiles needed to cover the grid without overlap.

    Every tile has exactly one owner, so this is the overlap's cost alone, whatever the blocks.
    """
    computed = sum(
        len(owned_indices(grid, b.row, block_size, height)) * len(owned_indices(grid, b.col, block_size, width))
        for b in iter_blocks(height, width, block_size)
    )
    baseline = math.ceil(height / grid.tile_size) * math.ceil(width / grid.tile_size)
    return computed / baseline


def row_bands(rows: Span, height: int, offset: int = 0) -> list[Span]:
    """``rows`` cut where ``offset + k * height`` falls inside it (for every integer ``k``).

    With ``height`` a multiple of a file's internal block height and ``offset`` the first row of
    one of its blocks, each band covers whole rows of blocks: bands read in parallel never decode
    the same block twice.
    """
    if height <= 0:
        raise ValueError(f"band height must be positive, got {height}")
    bands = []
    start = rows.start
    while start < rows.stop:
        stop = min(rows.stop, offset + ((start - offset) // height + 1) * height)
        bands.append(Span(start, stop))
        start = stop
    return bands
