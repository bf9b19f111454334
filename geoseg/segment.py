"""Segment one output block: read block + halo, tile, forward, blend, argmax."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from rasterio.windows import Window

from geoseg.blending import NODATA, Accumulator, BlendMode, support, window_2d
from geoseg.grid import OutputGrid
from geoseg.inference import Predictor
from geoseg.scenes import SceneInfo, read_window
from geoseg.tiling import Block, Span, TileGrid


@dataclass(frozen=True)
class TilingSettings:
    tile_size: int
    overlap: int
    blend: BlendMode

    @property
    def grid(self) -> TileGrid:
        return TileGrid(self.tile_size, self.overlap)


@dataclass
class BlockResult:
    classes: np.ndarray
    confidence: np.ndarray
    tiles: int  # forward passes computed for this block
    # per scene path, for the scenes read: [valid pixels, pixels it filled] (halos included)
    valid_pixels: dict[str, list[int]] = field(default_factory=dict)


def read_composite(
    scenes: list[SceneInfo],
    grid: OutputGrid,
    rows: Span,
    cols: Span,
    n_bands: int,
    counts: dict[str, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Bands and validity for a window of the output grid; where scenes overlap, the first valid wins.

    ``counts`` (if given) gains each scene's valid pixels in the window and how many of them it
    filled; scenes after the window is complete are not read.
    """
    shape = (rows.size, cols.size)
    bands = np.zeros((n_bands, *shape), dtype=np.float32)
    valid = np.zeros(shape, dtype=bool)
    window = Window(cols.start, rows.start, cols.size, rows.size)
    for scene in scenes:
        data, scene_valid = read_window(scene, grid.crs, grid.affine, window)
        take = scene_valid & ~valid
        if counts is not None:
            tally = counts.setdefault(scene.path, [0, 0])
            tally[0] += int(scene_valid.sum())
            tally[1] += int(take.sum())
        if take.all():
            bands, valid = data, scene_valid
        elif take.any():
            bands[:, take] = data[:, take]
            valid |= take
        if valid.all():
            break
    return bands, valid


def segment_block(
    block: Block,
    scenes: list[SceneInfo],
    grid: OutputGrid,
    tiling: TilingSettings,
    predictor: Predictor,
    batch_size: int | None = None,
) -> BlockResult:
    """Classes and confidence of one block, identical whatever the block partition.

    Every tile whose window touches the block is computed, and tiles are accumulated in
    global row-major order, so each pixel sums the same terms in the same order as it would
    in any other block layout. The input is read one row of tiles at a time, the next row in
    a background thread while the model works on the current one (GDAL releases the GIL).
    """
    tg = tiling.grid
    size = tg.tile_size
    sup = support(tiling.blend, tg)
    tile_rows = tg.indices_touching(block.rows, grid.height, sup)
    tile_cols = tg.indices_touching(block.cols, grid.width, sup)
    read_cols = tg.read_span(tile_cols)
    n_bands = len(predictor.ckpt.bands)
    batch_size = batch_size or predictor.batch_size(size)
    counts: dict[str, list[int]] = {}

    def read_strip(i: int) -> tuple[np.ndarray, np.ndarray]:
        rows = Span(tg.origin(i), tg.origin(i) + size)
        bands, valid = read_composite(scenes, grid, rows, read_cols, n_bands, counts)
        return predictor.normalize(bands, valid), valid

    acc = Accumulator(predictor.n_classes, block.rows, block.cols)
    block_valid = np.zeros(block.shape, dtype=bool)
    window = window_2d(tiling.blend, tg.tile_size, tg.overlap)
    batch = np.empty((batch_size, n_bands, size, size), dtype=np.float32)
    pending: list[tuple[int, int]] = []  # (row0, col0) of the tiles in ``batch``
    n_tiles = 0

    def flush() -> None:
        probs = predictor.probabilities(batch[: len(pending)])
        for k, (r0, c0) in enumerate(pending):
            acc.add(probs[k], window, r0, c0)
        pending.clear()

    reader = _reader()
    next_strip = reader.submit(read_strip, tile_rows.start)
    for i in tile_rows:
        bands, valid = next_strip.result()
        if i + 1 in tile_rows:
            next_strip = reader.submit(read_strip, i + 1)
        _copy_core_validity(block_valid, valid, block, tg, i, read_cols)
        r0 = tg.origin(i)
        for j in tile_cols:
            c = tg.origin(j) - read_cols.start
            if not valid[:, c : c + size].any():  # all-nodata tiles add nothing: skip the pass
                continue
            batch[len(pending)] = bands[:, :, c : c + size]
            pending.append((r0, tg.origin(j)))
            n_tiles += 1
            if len(pending) == batch_size:
                flush()
    if pending:
        flush()
    classes, confidence = acc.finalize(block_valid)
    return BlockResult(classes, confidence, n_tiles, counts)


@lru_cache(maxsize=1)
def _reader() -> ThreadPoolExecutor:
    """One read-ahead thread per process, reused by every block (a new thread per block would
    also mean a new malloc arena, and memory that grows with the number of blocks)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="geoseg-read")


def _copy_core_validity(
    block_valid: np.ndarray, strip_valid: np.ndarray, block: Block, tg: TileGrid, i: int, read_cols: Span
) -> None:
    """Fill the block's validity from tile row ``i``'s core rows (cores partition the rows)."""
    core0, core1 = max(i * tg.stride, block.rows.start), min((i + 1) * tg.stride, block.rows.stop)
    if core0 >= core1:
        return
    strip_r0 = core0 - tg.origin(i)
    block_valid[core0 - block.rows.start : core1 - block.rows.start] = strip_valid[
        strip_r0 : strip_r0 + core1 - core0,
        block.cols.start - read_cols.start : block.cols.stop - read_cols.start,
    ]


def segment_block_most_confident(
    block: Block, scenes: list[SceneInfo], grid: OutputGrid, tiling: TilingSettings, predictor: Predictor
) -> BlockResult:
    """Segment each scene on its own and keep, per pixel, the most confident answer (ties: the earlier scene)."""
    best: BlockResult | None = None
    for scene in scenes:
        result = segment_block(block, [scene], grid, tiling, predictor)
        if best is None:
            best = result
            continue
        better = (result.classes != NODATA) & ((best.classes == NODATA) | (result.confidence > best.confidence))
        best.classes[better] = result.classes[better]
        best.confidence[better] = result.confidence[better]
        best.tiles += result.tiles
        best.valid_pixels.update(result.valid_pixels)
    if best is None:
        return segment_block(block, [], grid, tiling, predictor)
    return best
