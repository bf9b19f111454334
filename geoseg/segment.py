"""Segment one output block: read block + halo, tile, forward, blend, argmax."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from rasterio.windows import Window

from geoseg.blending import Accumulator, BlendMode, support, window_2d
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


def read_composite(
    scenes: list[SceneInfo], grid: OutputGrid, rows: Span, cols: Span, n_bands: int
) -> tuple[np.ndarray, np.ndarray]:
    """Bands and validity for a window of the output grid; where scenes overlap, the first valid wins."""
    shape = (rows.size, cols.size)
    bands = np.zeros((n_bands, *shape), dtype=np.float32)
    valid = np.zeros(shape, dtype=bool)
    window = Window(cols.start, rows.start, cols.size, rows.size)
    for scene in scenes:
        data, scene_valid = read_window(scene, grid.crs, grid.affine, window)
        take = scene_valid & ~valid
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
    batch_size: int,
) -> BlockResult:
    """Classes and confidence of one block, identical whatever the block partition.

    Every tile whose window touches the block is computed, and tiles are accumulated in
    global row-major order, so each pixel sums the same terms in the same order as it would
    in any other block layout.
    """
    tg = tiling.grid
    sup = support(tiling.blend, tg)
    tile_rows = tg.indices_touching(block.rows, grid.height, sup)
    tile_cols = tg.indices_touching(block.cols, grid.width, sup)
    read_rows, read_cols = tg.read_span(tile_rows), tg.read_span(tile_cols)
    bands, valid = read_composite(scenes, grid, read_rows, read_cols, len(predictor.ckpt.bands))
    block_valid = valid[
        block.rows.start - read_rows.start : block.rows.stop - read_rows.start,
        block.cols.start - read_cols.start : block.cols.stop - read_cols.start,
    ]
    acc = Accumulator(predictor.n_classes, block.rows, block.cols)
    if not block_valid.any():
        classes, confidence = acc.finalize(block_valid)
        return BlockResult(classes, confidence, 0)
    predictor.normalize(bands, valid)
    window = window_2d(tiling.blend, tg.tile_size, tg.overlap)
    size = tg.tile_size
    origins = []
    for i in tile_rows:
        for j in tile_cols:
            r, c = tg.origin(i) - read_rows.start, tg.origin(j) - read_cols.start
            if valid[r : r + size, c : c + size].any():  # all-nodata tiles add nothing: skip the pass
                origins.append((r, c))
    batch = np.empty((min(batch_size, len(origins)), bands.shape[0], size, size), dtype=np.float32)
    for start in range(0, len(origins), batch_size):
        chunk = origins[start : start + batch_size]
        for k, (r, c) in enumerate(chunk):
            batch[k] = bands[:, r : r + size, c : c + size]
        probs = predictor.probabilities(batch[: len(chunk)])
        for k, (r, c) in enumerate(chunk):
            acc.add(probs[k], window, r + read_rows.start, c + read_cols.start)
    classes, confidence = acc.finalize(block_valid)
    return BlockResult(classes, confidence, len(origins))
