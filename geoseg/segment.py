"""Segment output blocks: each block computes the tiles it owns, then finishes with its neighbours' help.

Two steps per block (see :mod:`geoseg.tiling` for ownership):

1. :func:`predict_block` reads the block's owned tiles (plus halo), runs the forward passes and
   sums their fixed-point votes. Pixels only its own tiles reach (the *interior*) are final; the
   votes on the rest (the *frame*) are kept for step 2.
2. :func:`finish_block` adds the frames of every block whose tiles reach this one and takes the
   argmax of the edge band.

Every tile is computed once in the whole mosaic, and because the votes are integers the
result does not depend on which block adds what, or in which order.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
from rasterio.io import DatasetReader
from rasterio.windows import Window

from geoseg import storage
from geoseg.blending import NODATA, Accumulator, BlendMode, fixed_window, support
from geoseg.cluster import usable_cores
from geoseg.grid import OutputGrid
from geoseg.scenes import SceneInfo, open_dataset, read_window, same_grid
from geoseg.tiling import AxisOwnership, Block, Rect, Span, TileGrid, axis_ownership, relative_slices, ring, row_bands

if TYPE_CHECKING:  # torch is imported by the blocks' forward passes alone (a worker that only
    # finishes or polygonizes blocks starts 2 s sooner without it)
    from geoseg.device_blending import DeviceAccumulator
    from geoseg.inference import Predictor


@dataclass(frozen=True)
class TilingSettings:
    """The global tile grid, its blending window, and the output blocks that share out its tiles."""

    tile_size: int
    overlap: int
    blend: BlendMode
    block_size: int

    @property
    def grid(self) -> TileGrid:
        return TileGrid(self.tile_size, self.overlap)

    @property
    def support(self) -> Span:
        return support(self.blend, self.grid)

    def ownership(self, block: Block, grid: OutputGrid) -> tuple[AxisOwnership, AxisOwnership]:
        """What ``block`` owns along rows and along columns."""
        tg, sup = self.grid, self.support
        return (
            axis_ownership(tg, block.row, self.block_size, grid.height, sup),
            axis_ownership(tg, block.col, self.block_size, grid.width, sup),
        )


@dataclass
class Frame:
    """Votes of a block's own tiles on pixels that other blocks' tiles reach too."""

    rect: Rect
    sums: np.ndarray  # (K+1, rows, cols) int32: class votes, then the weight


class StoppedError(Exception):
    """:func:`predict_block` stopped before its end, as its caller asked."""


@dataclass
class Partial:
    """Step 1's result for one block."""

    interior: Rect
    classes: np.ndarray  # over the interior
    confidence: np.ndarray
    frames: list[Frame]
    tiles: int  # forward passes computed
    forward_s: float = 0.0  # seconds spent in them (model, softmax, weighting)
    # per scene path: [valid pixels read, pixels it filled] (halos included)
    valid_pixels: dict[str, list[int]] = field(default_factory=dict)


def read_composite(
    scenes: list[SceneInfo],
    grid: OutputGrid,
    rect: Rect,
    n_bands: int,
    datasets: dict[str, DatasetReader] | None = None,
    counts: dict[str, list[int]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Bands and validity for a window of the output grid; where scenes overlap, the first valid wins.

    ``datasets`` holds scenes already open; ``counts`` (if given) gains each scene's valid pixels
    in the window and how many of them it filled; scenes after the window is complete are not read.
    """
    shape = (rect.rows.size, rect.cols.size)
    bands: np.ndarray | None = None
    valid = np.zeros(shape, dtype=bool)
    window = Window(rect.cols.start, rect.rows.start, rect.cols.size, rect.rows.size)
    for scene in scenes:
        src = datasets.get(scene.path) if datasets else None
        data, scene_valid = read_window(scene, grid.crs, grid.affine, window, src)
        take = scene_valid & ~valid
        if counts is not None:
            tally = counts.setdefault(scene.path, [0, 0])
            tally[0] += int(scene_valid.sum())
            tally[1] += int(take.sum())
        if (
            bands is None or not valid.any()
        ):  # the first scene with data: take it whole (normalize zeroes its invalid pixels)
            bands, valid = data, scene_valid
        elif take.any():
            np.copyto(bands, data, where=take)
            valid |= take
        if valid.all():
            break
    if bands is None:  # no scene
        bands = np.zeros((n_bands, *shape), dtype=np.float32)
    return bands, valid


def predict_block(
    block: Block,
    scenes: list[SceneInfo],
    grid: OutputGrid,
    tiling: TilingSettings,
    predictor: Predictor,
    batch_size: int | None = None,
    read_threads: int = 1,
    on_device: bool | None = None,
    stop: Callable[[], bool] | None = None,
) -> Partial:
    """Forward passes over the tiles ``block`` owns; the interior finished, the frame's votes kept.
    ``stop`` is asked before each row of tiles: :class:`StoppedError` is raised once it says so.

    The input is read ahead by ``read_threads`` threads while the model works (GDAL releases the
    GIL), in bands of whole file blocks, and served one row of tiles at a time (:func:`read_tile_rows`).
    The votes are added up on the model's device when ``on_device`` (default: on a GPU, see
    :mod:`geoseg.device_blending`), on the host otherwise; the result is the same to the bit.
    """
    from geoseg.device_blending import DeviceAccumulator
    from geoseg.inference import PassTimer

    tg, size = tiling.grid, tiling.tile_size
    own_rows, own_cols = tiling.ownership(block, grid)
    if on_device is None:
        on_device = predictor.device.type == "cuda"
    acc: Accumulator | DeviceAccumulator
    if on_device:
        acc = DeviceAccumulator(predictor.n_classes, own_rows.extent, own_cols.extent, predictor.device)
    else:
        acc = Accumulator(predictor.n_classes, own_rows.extent, own_cols.extent)
    window = fixed_window(tiling.blend, size, tiling.overlap)
    counts: dict[str, list[int]] = {}
    n_tiles = 0
    timer = PassTimer(predictor.device)
    if own_rows.owned and own_cols.owned:
        batch_size = batch_size or predictor.batch_size(size)
        batch = np.empty((batch_size, len(predictor.ckpt.bands), size, size), dtype=np.float32)
        pending: list[tuple[int, int, np.ndarray | None]] = []  # (row0, col0, validity) of the tiles in ``batch``

        def flush() -> None:
            tiles = batch[: len(pending)]
            with timer:
                votes = predictor.device_votes(tiles, window) if on_device else predictor.votes(tiles, window)
            for k, (r0, c0, valid_tile) in enumerate(pending):
                acc.add(votes[k], window, r0, c0, valid_tile)
            pending.clear()

        read_cols = tg.read_span(own_cols.owned)
        # closed as the loop ends, stopped or failed too: its reads in flight, its open files
        with closing(
            read_tile_rows(scenes, grid, tg, own_rows.owned, read_cols, predictor, counts, read_threads)
        ) as strips:
            for i, (bands, valid) in zip(own_rows.owned, strips, strict=True):
                if stop is not None and stop():
                    raise StoppedError(f"block {block.key}")
                for j in own_cols.owned:
                    c = tg.origin(j) - read_cols.start
                    valid_tile = valid[:, c : c + size]
                    if not valid_tile.any():  # all-nodata tiles add nothing: skip the pass
                        continue
                    batch[len(pending)] = bands[:, :, c : c + size]
                    # a fully valid tile adds its window as it is (no masked copy)
                    pending.append((tg.origin(i), tg.origin(j), None if valid_tile.all() else valid_tile))
                    n_tiles += 1
                    if len(pending) == batch_size:
                        flush()
        if pending:
            flush()
    interior = Rect(own_rows.interior, own_cols.interior)
    if interior.empty:
        classes = confidence = np.empty((0, 0), dtype=np.uint8)
    elif n_tiles == 0:  # no valid pixel: nothing to add up
        classes = np.full((interior.rows.size, interior.cols.size), NODATA, dtype=np.uint8)
        confidence = np.zeros_like(classes)
    else:
        classes, confidence = acc.finalize(interior.rows, interior.cols)
    extent = Rect(own_rows.extent, own_cols.extent)
    frames = [] if n_tiles == 0 else voted_frames(acc, ring(extent, interior), copy=not on_device)
    return Partial(interior, classes, confidence, frames, n_tiles, timer.seconds(), counts)


def voted_frames(acc: Accumulator | DeviceAccumulator, rects: list[Rect], copy: bool) -> list[Frame]:
    """The frame's votes, each rectangle cut down to the pixels that have any (none: dropped), so
    a block with few valid pixels saves little. On the host, copies, not views: a view would keep
    the whole accumulator alive as long as Dask holds the result (from a device they are copies)."""
    frames = []
    for rect in rects:
        sums = acc.region(rect.rows, rect.cols)
        weight = np.asarray(sums[-1])
        rows, cols = np.flatnonzero(weight.any(axis=1)), np.flatnonzero(weight.any(axis=0))
        if rows.size == 0:
            continue
        r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        voted = Rect(Span(rect.rows.start + r0, rect.rows.start + r1), Span(rect.cols.start + c0, rect.cols.start + c1))
        cropped = (r1 - r0, c1 - c0) != weight.shape  # a copy then, not a view of the whole region
        frames.append(Frame(voted, np.array(sums[:, r0:r1, c0:c1], copy=copy or cropped)))
    return frames


def read_tile_rows(
    scenes: list[SceneInfo],
    grid: OutputGrid,
    tg: TileGrid,
    tile_rows: range,
    cols: Span,
    predictor: Predictor,
    counts: dict[str, list[int]],
    threads: int = 1,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Normalised bands and validity of each tile row, read ahead by ``threads`` reader threads.

    The block's rows are read in bands of whole file blocks (:func:`geoseg.tiling.row_bands`),
    several at once when there are several threads (GDAL releases the GIL): a GPU decodes
    nothing and waits for its input, where one thread reads ~20 Mpix/s (benchmarks/README.md).
    A tile row inside one band is a view of it; one across two is a copy.
    """
    height, offset = band_layout(scenes[0], grid, tg.tile_size) if scenes else (tg.tile_size, 0)
    todo = deque(row_bands(tg.read_span(tile_rows), height, offset))
    reader = _BandReader(scenes, grid, cols, predictor)
    pool = _readers(threads)
    ahead: deque[Future] = deque()
    held: list[tuple[Span, np.ndarray, np.ndarray]] = []  # bands read, top to bottom
    try:
        for i in tile_rows:
            rows = Span(tg.origin(i), tg.origin(i) + tg.tile_size)
            while not held or held[-1][0].stop < rows.stop:
                while todo and len(ahead) <= threads:
                    ahead.append(pool.submit(reader.read, todo.popleft()))
                band, data, valid, band_counts = ahead.popleft().result()
                held.append((band, data, valid))
                for path, (n_valid, n_filled) in band_counts.items():
                    tally = counts.setdefault(path, [0, 0])
                    tally[0] += n_valid
                    tally[1] += n_filled
            held = [h for h in held if h[0].stop > rows.start]  # bands above this row are done
            yield _rows_of(held, rows)
    finally:
        for future in ahead:  # never close the datasets under a read in flight
            if not future.cancel():
                future.exception()
        reader.close()


def reader_threads(requested: int, predictor: Predictor) -> int:
    """Reader threads per block: ``requested``, or when 0, one on CPU (the cores run the model)
    and half the usable cores, up to 8, on a GPU (the cores are free, and the GPU needs input
    at many times one thread's decoding speed)."""
    if requested > 0:
        return requested
    if predictor.device.type != "cuda":
        return 1
    return max(1, min(8, usable_cores() // 2))


def band_layout(scene: SceneInfo, grid: OutputGrid, tile_size: int) -> tuple[int, int]:
    """Height and first row on the output grid of the bands to read ``scene`` in: whole rows of
    its file's blocks, at least a tile high. A file of very tall blocks (one strip for the whole
    file) or of unknown ones, or a scene warped onto the grid, is read a tile's height at a time."""
    block_rows = scene.block_rows
    if not 0 < block_rows <= 4 * tile_size or not same_grid(scene, grid.crs, grid.affine):
        return tile_size, 0
    return -(-tile_size // block_rows) * block_rows, round(grid.window_of(scene).row_off)


class _BandReader:
    """Reads row bands of a block's columns; each reader thread opens the scenes once per block
    (a dataset must not be shared between threads; GDAL's block cache is shared by all)."""

    def __init__(self, scenes: list[SceneInfo], grid: OutputGrid, cols: Span, predictor: Predictor) -> None:
        self.scenes, self.grid, self.cols, self.predictor = scenes, grid, cols, predictor
        self._local = threading.local()
        self._stacks: list[ExitStack] = []
        self._lock = threading.Lock()

    def read(self, rows: Span) -> tuple[Span, np.ndarray, np.ndarray, dict[str, list[int]]]:
        """The band ``rows``: normalised bands, validity, and each scene's pixel counts (as in
        :func:`read_composite`)."""
        counts: dict[str, list[int]] = {}
        n_bands = len(self.predictor.ckpt.bands)
        bands, valid = read_composite(self.scenes, self.grid, Rect(rows, self.cols), n_bands, self._datasets(), counts)
        return rows, self.predictor.normalize(bands, valid), valid, counts

    def _datasets(self) -> dict[str, DatasetReader]:
        datasets = getattr(self._local, "datasets", None)
        if datasets is None:
            stack = ExitStack()
            with self._lock:
                self._stacks.append(stack)
            datasets = {s.path: stack.enter_context(open_dataset(s)) for s in self.scenes}
            self._local.datasets = datasets
        return datasets

    def close(self) -> None:
        """Close every thread's datasets; only once no read is in flight."""
        for stack in self._stacks:
            stack.close()


def _rows_of(held: list[tuple[Span, np.ndarray, np.ndarray]], rows: Span) -> tuple[np.ndarray, np.ndarray]:
    """Bands and validity of ``rows`` from the bands that cover them (in order)."""
    parts = []
    for band, data, valid in held:
        lo, hi = max(rows.start, band.start) - band.start, min(rows.stop, band.stop) - band.start
        if lo < hi:
            parts.append((data[:, lo:hi], valid[lo:hi]))
    if len(parts) == 1:
        return parts[0]
    return np.concatenate([p[0] for p in parts], axis=1), np.concatenate([p[1] for p in parts], axis=0)


@lru_cache(maxsize=4)
def _readers(threads: int) -> ThreadPoolExecutor:
    """The reader threads of this process, reused by every block (a new thread per block would
    also mean a new malloc arena where arenas are not capped, and memory that grows with the
    number of blocks)."""
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="geoseg-read", initializer=_hold_gdal_env)


_reader_env = threading.local()


def _hold_gdal_env() -> None:
    """Give a reader thread a GDAL environment for its lifetime. rasterio's are per thread, and a
    dataset opened without one closes the one it made on close: only in the thread that opened it."""
    _reader_env.env = storage.gdal_env().__enter__()


def finish_block(
    block: Block, own: Partial | None, reaching: Iterable[Partial], n_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Classes and confidence of ``block``: ``own``'s interior, and the edge band summed from the frames
    of every block whose tiles reach it (``reaching``, ``own`` included)."""
    classes = np.full(block.shape, NODATA, dtype=np.uint8)
    confidence = np.zeros(block.shape, dtype=np.uint8)
    bounds = Rect(block.rows, block.cols)
    interior = own.interior if own is not None else Rect(Span(0, 0), Span(0, 0))
    if not interior.empty:
        dest = relative_slices(block.rows, block.cols, interior.rows, interior.cols)
        classes[dest], confidence[dest] = own.classes, own.confidence
    frames = [f for p in reaching for f in p.frames]
    for rect in ring(bounds, interior):
        acc = Accumulator(n_classes, rect.rows, rect.cols)
        for frame in frames:
            acc.add_sums(frame.sums, frame.rect.rows, frame.rect.cols)
        dest = relative_slices(block.rows, block.cols, rect.rows, rect.cols)
        classes[dest], confidence[dest] = acc.finalize()
    return classes, confidence


def most_confident(layers: Iterable[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel, the class of the most confident layer (ties: the earlier layer); nodata where none has one."""
    best_classes: np.ndarray | None = None
    best_confidence: np.ndarray | None = None
    for classes, confidence in layers:
        if best_classes is None or best_confidence is None:
            best_classes, best_confidence = classes.copy(), confidence.copy()
            continue
        better = (classes != NODATA) & ((best_classes == NODATA) | (confidence > best_confidence))
        best_classes[better] = classes[better]
        best_confidence[better] = confidence[better]
    if best_classes is None or best_confidence is None:
        raise ValueError("no layer to choose from")
    return best_classes, best_confidence
