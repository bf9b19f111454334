"""The global tile grid and the output blocks: pure integer maths, no I/O.

Tiles are anchored to the output grid, never to a block, which is what makes the mosaic
independent of the block size (invariant 1 of DESIGN.md). Tile ``(i, j)`` covers rows
``[i*s - h, i*s - h + T)`` and columns likewise, with ``T`` the tile size, ``s = T - overlap``
the stride and ``h = overlap // 2``; its *core* ``[i*s, (i+1)*s)`` partitions the plane.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """A half-open pixel interval ``[start, stop)`` along one axis."""

    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


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


def iter_blocks(height: int, width: int, block_size: int) -> Iterator[Block]:
    """Output blocks in row-major order; edge blocks are clipped to the grid."""
    for r, r0 in enumerate(range(0, height, block_size)):
        for c, c0 in enumerate(range(0, width, block_size)):
            yield Block(r, c, Span(r0, min(r0 + block_size, height)), Span(c0, min(c0 + block_size, width)))


def overlap_cost(height: int, width: int, block_size: int, grid: TileGrid, support: Span | None = None) -> float:
    """Tiles computed by all blocks / tiles needed to cover the grid without overlap."""
    computed = sum(
        len(grid.indices_touching(b.rows, height, support)) * len(grid.indices_touching(b.cols, width, support))
        for b in iter_blocks(height, width, block_size)
    )
    baseline = math.ceil(height / grid.tile_size) * math.ceil(width / grid.tile_size)
    return computed / baseline
