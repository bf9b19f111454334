"""The block tasks of a segmentation run, and the Dask graph of them (run by the caller).

    step 1, predict_task: the tiles a block owns -> votes, saved under OUT/.geoseg/partials/<fingerprint>
    step 2, finish_task:  its own and its neighbours' votes -> classes, confidence -> store, marker
    polygonize_task:      a finished block -> polygons (pieces cut by block edges kept apart)

Which scenes a block reads comes from their footprints on the output grid, down to the blocks a
sparse file stores: a block no scene reaches with data gets no task at all. Each task takes and
returns plain values, and meets the others through Dask (its results) and the run's store,
never a shared disk.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dask
import numpy as np
from dask.delayed import Delayed, delayed
from rasterio.windows import Window

from geoseg import mosaic, overviews, partials, runstate, storage, vectorize
from geoseg.blending import NODATA
from geoseg.config import InferenceSettings, VectorConfig
from geoseg.grid import OutputGrid
from geoseg.mosaic import MOSAIC_NAME
from geoseg.runstate import STATE_DIR
from geoseg.scenes import DataCoverage, SceneInfo, same_grid
from geoseg.segment import TilingSettings, finish_block, most_confident, predict_block, reader_threads
from geoseg.tiling import Block, Rect, level_chunks

PARTIALS_DIR = f"{STATE_DIR}/partials"


def partials_root(out: str, fingerprint: str) -> str:
    """Where a run's step-1 results lie: apart from those of runs with another fingerprint. The
    step 1 of a killed run may still be running on the workers, and save its votes after a run
    with another model or grid (``--overwrite``) has begun: that run must never read them."""
    return storage.join(out, PARTIALS_DIR, fingerprint[:16])


@dataclass(frozen=True)
class Footprint:
    """Where a scene lands on the output grid, and which parts of it hold data (sparse files)."""

    window: Window
    coverage: DataCoverage | None = None  # only for a scene on the grid's own lattice

    def reaches(self, block: Block, margin: int) -> bool:
        """Whether the scene may have a valid pixel in ``block`` widened by ``margin``."""
        fp = self.window
        if not (
            fp.col_off < block.cols.stop + margin
            and fp.col_off + fp.width > block.cols.start - margin
            and fp.row_off < block.rows.stop + margin
            and fp.row_off + fp.height > block.rows.start - margin
        ):
            return False
        if self.coverage is None:
            return True
        r0, c0 = round(fp.row_off), round(fp.col_off)
        rows = (block.rows.start - margin - r0, block.rows.stop + margin - r0)
        cols = (block.cols.start - margin - c0, block.cols.stop + margin - c0)
        return self.coverage.any_in(rows, cols)


def footprints_on(
    grid: OutputGrid, scenes: list[SceneInfo], coverage: dict[str, DataCoverage | None]
) -> list[Footprint]:
    """Each scene's footprint on ``grid``, with the blocks a sparse file stores (``coverage``,
    from :func:`geoseg.scenes.data_coverage`) where it needs no warping."""
    return [
        Footprint(grid.window_of(s), coverage.get(s.path) if same_grid(s, grid.crs, grid.affine) else None)
        for s in scenes
    ]


def scenes_for(block: Block, scenes: list[SceneInfo], footprints: list[Footprint], margin: int) -> list[SceneInfo]:
    """The scenes that may have a valid pixel in the block or its halo."""
    return [scene for scene, fp in zip(scenes, footprints, strict=True) if fp.reaches(block, margin)]


def predict_task(
    block: Block,
    layers: dict[str, list[SceneInfo]],
    grid: OutputGrid,
    tiling: TilingSettings,
    settings: InferenceSettings,
    partials_at: str,
    read_threads: int = 0,
    numerics: str | None = None,
) -> dict[str, Any]:
    """A Dask task (step 1): the block's own tiles, saved for itself and its neighbours.

    ``layers`` maps a layer name to the scenes composited in it (one layer with all scenes, or
    one per scene for the ``confidence`` rule). A block saved by an earlier attempt at the same
    run (in ``partials_at``, :func:`partials_root`) is reused.
    With ``numerics`` (the run's :func:`geoseg.inference.numerics`), a worker that computes
    votes otherwise (one that joined late) fails the block rather than mix them.
    Errors are returned, not raised: one bad block must not sink the run.
    """
    from geoseg.inference import get_predictor
    from geoseg.inference import numerics as numerics_of

    folder = storage.join(partials_at, block.key)
    start = time.perf_counter()
    try:
        # asked each time, though a fresh run finds none: Dask computes step 1 again when a
        # worker holding its result is lost, and the saved record spares that forward pass. On a
        # store the request is in flight while the block is read, and stops it when it finds one.
        saved = storage.in_background(partials.load_record, folder, remote=storage.is_url(folder))

        def answered() -> bool:  # a saved record, or an error: no use computing the block
            return saved.done() and (saved.exception() is not None or saved.result() is not None)

        if answered():  # on a disk, asked and answered already (an error is raised here)
            return {"block": block.key, **saved.result()}
        failed: Exception | None = None
        try:  # whatever fails here, a saved record found meanwhile answers for the block
            if numerics is not None and (own := numerics_of(settings)) != numerics:
                raise RuntimeError(f"this worker computes votes as {own}, the run as {numerics}")
            predictor = get_predictor(settings)
            readers = reader_threads(read_threads, predictor)
            results = {
                name: predict_block(block, scenes, grid, tiling, predictor, read_threads=readers, stop=answered)
                for name, scenes in layers.items()
            }
        except Exception as exc:  # stopped, or failed before the saved record came
            results, failed = {}, exc.with_traceback(None)  # no frame of this task kept alive by it
        if (record := saved.result()) is not None:  # raises the lookup's error
            return {"block": block.key, **record}
        if failed is not None:
            raise failed
        counts: dict[str, list[int]] = {}
        for partial in results.values():  # by a name without a signature (storage.record_name)
            counts.update({storage.record_name(path): n for path, n in partial.valid_pixels.items()})
        record = {
            "status": "done",
            "tiles": sum(p.tiles for p in results.values()),
            "forward_s": round(sum(p.forward_s for p in results.values()), 3),
            "predict_s": round(time.perf_counter() - start, 3),
            "scene_valid_pixels": counts,
            "layers": partials.layer_index(results),
        }
        record, pack = partials.save_block(folder, results, record)
        # the pack travels to the neighbours' step 2 with the record (through Dask, which
        # holds it while they need it): on a store, no request of theirs fetches it again
        return {"block": block.key, **record, **({PACK: pack} if pack is not None else {})}
    except Exception as exc:
        return {"block": block.key, "status": "failed", "error": runstate.error_text(exc)}


def finish_task(
    block: Block,
    reaching: list[dict[str, Any]],
    n_classes: int,
    out: str,
    partials_at: str,
    run_id: str | None = None,
) -> dict[str, Any]:
    """A Dask task (step 2): add the neighbours' frames, write the block's region, leave a marker.

    ``reaching`` are the step-1 records of the blocks whose tiles reach this one, its own first,
    saved in ``partials_at``. With ``run_id``, nothing is written unless that run still holds
    OUT's lease.
    """
    start = time.perf_counter()
    own = reaching[0]
    try:
        failed = [r for r in reaching if r["status"] != "done"]
        if failed:
            reason = failed[0]["error"]
            which = "" if failed[0]["block"] == block.key else f"block {failed[0]['block']}, which reaches it, failed: "
            raise RuntimeError(which + reason)
        bounds = Rect(block.rows, block.cols)
        loaded = storage.concurrently(  # on a store: the neighbours' objects in flight together
            lambda r: partials.load_layers(
                storage.join(partials_at, r["block"]),
                r.get("layers"),
                interior=r is own,
                within=bounds,
                pack=r.get(PACK),
            ),
            reaching,
            remote=storage.is_url(partials_at),
        )
        own_layers, others = loaded[0], loaded[1:]
        # on a store, asked while the votes are added up (its round trip hidden); on a disk, at the write
        lease = storage.in_background(runstate.require_lease, out, run_id) if storage.is_url(out) else None
        results = []
        for name in sorted({name for layers in [own_layers, *others] for name in layers}):
            sources = [layers[name] for layers in [own_layers, *others] if name in layers]
            results.append(finish_block(block, own_layers.get(name), sources, n_classes))
        if results:
            classes, confidence = most_confident(results)
        else:  # no scene reaches the block
            classes, confidence = finish_block(block, None, [], n_classes)
        histogram = np.bincount(classes.ravel(), minlength=256)
        if lease is None:
            runstate.require_lease(out, run_id)
        else:
            lease.result()
        levels, written = {}, bool(histogram[:NODATA].any())
        if written:  # an all-nodata block is what the store holds already (fill values)
            store = storage.join(out, MOSAIC_NAME)
            mosaic.write_block(store, block, classes, confidence, run_id)
            levels = overviews.levels(classes, confidence, mosaic.overview_factors_of(store, run_id))
        record = {
            "status": "done",
            "tiles": own["tiles"],
            "forward_s": own.get("forward_s", 0.0),  # absent in partials saved by older versions
            "seconds": round(own["predict_s"] + time.perf_counter() - start, 3),
            "scene_valid_pixels": own["scene_valid_pixels"],
            "histogram": {str(k): int(v) for k, v in enumerate(histogram) if v},
        }
        runstate.commit_block(out, block.key, record)
        # what the block's own later tasks (its overview windows, its polygons) take from
        # memory instead of reading the store again
        return {"block": block.key, **record, LEVELS: levels, ARRAYS: (classes, confidence) if written else None}
    except Exception as exc:
        return {"block": block.key, "status": "failed", "error": runstate.error_text(exc)}


PACK = "step1_pack"  # what step 1 hands step 2 on a store: the bytes of the block's pack
LEVELS = "overview_levels"  # what step 2 hands its overview chunks: each level's windows of the block
ARRAYS = "block_arrays"  # and its polygons: the block's classes and confidence


def record_of(finished: dict[str, Any]) -> dict[str, Any]:
    """A Dask task: step 2's record without the block's arrays (what the client gets)."""
    return {k: v for k, v in finished.items() if k not in (LEVELS, ARRAYS)}


def level_piece(finished: dict[str, Any], block: Block, factor: int) -> tuple[int, int, Any, Any] | None:
    """A Dask task: the block's window on overview level ``factor``, where it lies on the level
    (None: a block with no data)."""
    window = finished.get(LEVELS, {}).get(factor)
    return None if window is None else (block.rows.start // factor, block.cols.start // factor, *window)


def stored_levels_task(block: Block, out: str, run_id: str | None = None) -> dict[str, Any]:
    """A Dask task: the overview windows of a block committed by an earlier run, from the mosaic."""
    store = storage.join(out, MOSAIC_NAME)
    classes, confidence = mosaic.read_regions(
        store, [(mosaic.CLASSES, *block.region), (mosaic.CONFIDENCE, *block.region)], run_id
    )
    if not (classes != NODATA).any():
        return {}
    return {LEVELS: overviews.levels(classes, confidence, mosaic.overview_factors_of(store, run_id))}


def overview_chunk_task(
    factor: int,
    origin: tuple[int, int],
    span: int,
    *pieces: tuple[int, int, Any, Any] | None,
    out: str,
    run_id: str | None,
) -> None:
    """A Dask task: one chunk of an overview level, written whole from its blocks' windows, then
    its marker."""
    runstate.require_lease(out, run_id)
    mosaic.write_overview_chunk(storage.join(out, MOSAIC_NAME), factor, origin, span, list(pieces), run_id)
    runstate.commit_overview_chunk(out, chunk_name(factor, origin[0] // span, origin[1] // span))


def chunk_name(factor: int, row: int, col: int) -> str:
    """How the run names an overview chunk (task results, markers, failed records)."""
    return f"overviews/{factor}/{row}_{col}"


def overview_graph(
    blocks: list[Block],
    finished: dict[str, Delayed],
    stored: Callable[[Block], Delayed | None],
    factors: list[int],
    block_size: int,
    unwritten: Callable[[str], bool],
    write_chunk: Callable[..., None],
    tag: str,
    due: dict[str, int] | None = None,
) -> dict[str, Delayed]:
    """The overview chunks to write as tasks: each level's chunk is a block's size and holds
    ``f`` x ``f`` blocks' windows, so it is written once, whole, after those blocks: the ones
    ``finished`` in this run hand their windows on, others (``stored``: committed before) read
    theirs from the mosaic. Only chunks with a block of this run, and those an earlier run left
    ``unwritten`` (by name: it was stopped after their blocks). ``due``: the priority of each
    block's step 2; a chunk gets its last block's. The tasks by chunk (:func:`chunk_name`)."""
    due = due or {}
    reread: dict[str, Delayed] = {}
    chunks = {}
    for f in factors:
        for (i, j), members in level_chunks(blocks, f).items():
            name = chunk_name(f, i, j)
            if not any(b.key in finished for b in members) and not unwritten(name):
                continue
            pieces = []
            for b in members:
                if b.key not in finished and b.key not in reread:
                    reread[b.key] = stored(b)
                source = finished.get(b.key, reread.get(b.key))
                if source is not None:
                    with dask.annotate(priority=due.get(b.key, 0)):
                        key = f"level-piece-{tag}-{f}-{b.key}"
                        pieces.append(delayed(level_piece, pure=False)(source, b, f, dask_key_name=key))
            origin = (i * block_size, j * block_size)
            with dask.annotate(priority=min((due[b.key] for b in members if b.key in due), default=0)):
                key = f"overview-{tag}-{f}-{i}_{j}"
                chunk = delayed(write_chunk, pure=False)(f, origin, block_size, *pieces, dask_key_name=key)
                chunks[name] = chunk
    return chunks


def polygon_halo(vector: VectorConfig) -> int:
    """Pixels around a block that its polygons depend on: the sieve's and the hole filling's reach."""
    return vectorize.sieve_halo(vector.mmu_pixels) + vectorize.sieve_halo(vector.fill_holes_pixels)


def sieve_reach(block: Block, by_index: dict[tuple[int, int], Block], halo: int, block_size: int) -> list[Block]:
    """The blocks whose pixels ``block``'s polygons read (itself first): every block within
    ``halo`` pixels of it, however many blocks wide the halo is."""
    k = -(-halo // block_size)
    return [block] + [
        by_index[(r, c)]
        for r in range(block.row - k, block.row + k + 1)
        for c in range(block.col - k, block.col + k + 1)
        if (r, c) != (block.row, block.col) and (r, c) in by_index
    ]


def polygonize_task(
    block: Block,
    *after: dict[str, Any],
    out: str,
    grid: OutputGrid,
    vector: VectorConfig,
    run_id: str | None = None,
) -> vectorize.BlockPolygons:
    """A Dask task: polygons of one block, sieved with a halo wide enough to match the whole
    mosaic. ``after``: step-2 records it waited for, the block's own first; a block whose own
    says it holds no class has no polygon. ``run_id``: the run writing the mosaic, if any."""
    if after and not has_classes(after[0]):
        return vectorize.BlockPolygons()
    halo = polygon_halo(vector)
    if after and halo == 0 and after[0].get(ARRAYS) is not None:  # step 2's own output: not read again
        classes, confidence = after[0][ARRAYS]
    else:
        classes, confidence = sieved_block(block, out, grid, vector, halo, run_id)
    return vectorize.polygonize_block(classes, block, grid.affine, grid.height, grid.width, confidence)


def sieved_block(
    block: Block, out: str, grid: OutputGrid, vector: VectorConfig, halo: int, run_id: str | None
) -> tuple[Any, Any]:
    """A block's classes from the mosaic, sieved with ``halo`` around it, and its confidence."""
    r0, r1 = max(0, block.rows.start - halo), min(grid.height, block.rows.stop + halo)
    c0, c1 = max(0, block.cols.start - halo), min(grid.width, block.cols.stop + halo)
    store = storage.join(out, MOSAIC_NAME)
    try:
        classes, confidence = mosaic.read_regions(
            store, [(mosaic.CLASSES, slice(r0, r1), slice(c0, c1)), (mosaic.CONFIDENCE, *block.region)], run_id
        )
    except Exception as exc:  # a damaged chunk: say where
        raise RuntimeError(f"{store}: block {block.key} cannot be read ({type(exc).__name__}: {exc})") from None
    inner = (slice(block.rows.start - r0, block.rows.stop - r0), slice(block.cols.start - c0, block.cols.stop - c0))
    classes = vectorize.sieve(classes, vector.mmu_pixels)
    classes = vectorize.sieve(classes, vector.fill_holes_pixels, enclosed_only=True)[inner]
    return classes, confidence


def has_classes(record: dict[str, Any] | None) -> bool:
    """Whether a block's record says it holds a class (not only nodata). No record: a block
    without data, or a failed one; a record without a histogram: assume it does."""
    if record is None or record.get("status") != "done":
        return False
    histogram = record.get("histogram")
    return histogram is None or any(int(k) != NODATA for k in histogram)


def scene_layers(
    block: Block, scenes: list[SceneInfo], footprints: list[Footprint], margin: int, rule: str
) -> dict[str, list[SceneInfo]]:
    """The scenes step 1 composites for ``block``: all in one layer, or one layer per scene
    (named by its place in the run's scene order) for the ``confidence`` rule."""
    picked = scenes_for(block, scenes, footprints, margin)
    if rule != "confidence":
        return {"all": picked} if picked else {}
    index = {s.path: k for k, s in enumerate(scenes)}
    return {f"scene{index[s.path]:05d}": [s] for s in picked}


def work_order(blocks: list[Block], grid: OutputGrid, tiling: TilingSettings) -> list[Block]:
    """Rows of blocks top to bottom; in a row, the blocks that own the most tiles first.

    Rows in order keep about one row of partial results on disk; biggest first in a row is the
    longest-processing-time rule, so the last blocks handed out are the short ones and the
    workers finish together.
    """

    def owned_tiles(b: Block) -> int:
        rows, cols = tiling.ownership(b, grid)
        return len(rows.owned) * len(cols.owned)

    return sorted(blocks, key=lambda b: (b.row, -owned_tiles(b), b.col))


def block_graph(
    needed: list[Block],
    todo: list[Block],
    reach: dict[str, list[Block]],
    order: dict[str, int],
    layers: dict[str, dict[str, list[SceneInfo]]],
    predict: Callable[..., dict[str, Any]],
    finish: Callable[..., dict[str, Any]],
    tag: str,
    resources: dict[str, float] | None = None,
    polygonize: Callable[..., Any] | None = None,
    sieved: dict[str, list[Block]] | None = None,
    polygons_from_memory: bool = False,
) -> tuple[list[Delayed], list[Delayed], dict[str, Delayed]]:
    """The two steps of the blocks as a Dask graph (built here, run by the caller): step 1 of
    each block in ``needed`` with its place in :func:`work_order` as priority, and step 2 of each
    block in ``todo`` right after the last step 1 it needs. ``predict(block, layers)`` and
    ``finish(block, reaching)`` are :func:`predict_task` and :func:`finish_task` with the run's
    other arguments bound. With ``polygonize`` (:func:`polygonize_task`, arguments bound), each
    block's polygons follow the step 2 of the blocks in ``sieved[block]`` (itself first), and
    take the block's arrays from its step 2 with ``polygons_from_memory`` (no sieve reach).
    Returns the step-2 records, the polygon tasks, and each block's step 2 (with its overview
    windows, for :func:`overview_graph`)."""
    step1 = {}
    for b in needed:
        with dask.annotate(priority=-2 * order[b.key], **({"resources": resources} if resources else {})):
            step1[b.key] = delayed(predict, pure=False)(b, layers[b.key], dask_key_name=f"predict-{tag}-{b.key}")
    step2, finished_of = [], {}
    for b in todo:
        last = max(order[n.key] for n in reach[b.key])
        with dask.annotate(priority=-2 * last - 1):
            sources = [step1[n.key] for n in reach[b.key]]
            finished_of[b.key] = delayed(finish, pure=False)(b, sources, dask_key_name=f"finish-{tag}-{b.key}")
            step2.append(delayed(record_of, pure=False)(finished_of[b.key], dask_key_name=f"record-{tag}-{b.key}"))
    parts = []
    if polygonize is not None and sieved is not None:
        finished = {b.key: task for b, task in zip(todo, step2, strict=True)}
        for b in todo:
            last = max(order[n.key] for s in sieved[b.key] for n in reach[s.key])
            with dask.annotate(priority=-2 * last - 1):
                # its own step 2 whole where it polygonizes the block's arrays as they are (no
                # sieve): otherwise they would be held until its neighbours are final
                own = finished_of[b.key] if polygons_from_memory else finished[b.key]
                after = [own, *(finished[s.key] for s in sieved[b.key][1:])]
                parts.append(delayed(polygonize, pure=False)(b, *after, dask_key_name=f"polygonize-{tag}-{b.key}"))
    return step2, parts, finished_of
