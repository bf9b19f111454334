"""Batch job: scenes -> Zarr class mosaic -> polygons, two Dask tasks per output block
(:mod:`geoseg.blocks`), then one per block for its polygons.

    catalog (headers) -> output grid -> [predict block]* -> [finish block -> write region]*
                      -> [polygonize block]* -> merge

Each tile is computed once, by the block holding its centre (step 1, ``predict``); a block is
finished (step 2) when the blocks whose tiles reach it have saved their partial results under
``OUT/.geoseg/partials``. Finished blocks leave a marker next to the mosaic, so running the same
command again after a crash computes only the missing blocks, reusing saved partial results.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Any

import geopandas as gpd
from distributed import Client, as_completed

from geoseg import mosaic, partials, runstate, stac_item, storage, vectorize
from geoseg.blocks import (
    MOSAIC_NAME,
    PARTIALS_DIR,
    Footprint,
    block_graph,
    finish_task,
    footprints_on,
    has_classes,
    polygonize_task,
    predict_task,
    scene_layers,
    work_order,
)
from geoseg.catalog import catalog, expand_inputs, input_dates, order_scenes, search_inputs
from geoseg.cluster import dask_client, torch_threads_per_worker
from geoseg.config import GridConfig, RunConfig, VectorConfig
from geoseg.grid import OutputGrid, aoi_bounds, chosen_grid, grid_from_scenes
from geoseg.inference import InferenceSettings
from geoseg.manifest import BlockRecord, ModelRecord, RunManifest, SceneRecord, Summary, Timings
from geoseg.models.checkpoint import Checkpoint, load_checkpoint
from geoseg.progress import track
from geoseg.quicklook import write_quicklook
from geoseg.runstate import MANIFEST_NAME, STATE_DIR, Lease, RunError, prepare_output
from geoseg.scenes import BandSelection, SceneInfo, data_coverage
from geoseg.segment import TilingSettings
from geoseg.tiling import Block, iter_blocks, reaching_blocks
from geoseg.vector_io import LayerWriter

log = logging.getLogger(__name__)

POLYGONS_NAME = "polygons.gpkg"
QUICKLOOK_NAME = "quicklook.png"
MERGE_GROUPS = 8  # tasks that merge the pieces cut by block edges, classes shared out by id
__all__ = ["MANIFEST_NAME", "MOSAIC_NAME", "STATE_DIR", "RunError", "prepare_output", "run"]


@dataclass
class RunResult:
    out: str
    mosaic: str
    polygons: str | None
    manifest: str
    failed_scenes: dict[str, str] = field(default_factory=dict)
    failed_blocks: dict[str, str] = field(default_factory=dict)
    quicklook: str | None = None

    @property
    def ok(self) -> bool:
        return not self.failed_scenes and not self.failed_blocks


def band_selection(cfg: RunConfig, ckpt: Checkpoint) -> BandSelection:
    """How each scene's bands are found for the model, masked, and scaled (unless the
    checkpoint's statistics are for raw values: ``raw_values`` in its metadata)."""
    return BandSelection(
        names=tuple(ckpt.bands),
        explicit=tuple(cfg.bands.items()),
        mask_band=cfg.mask.source if cfg.mask else None,
        invalid_values=tuple(cfg.mask.invalid_values) if cfg.mask else (),
        invalid_bits=cfg.mask.bit_mask if cfg.mask else 0,
        apply_scale=not ckpt.extra.get("raw_values", False),
        resampling=cfg.resampling,
    )


def output_grid(cfg: RunConfig, scenes: list[SceneInfo]) -> OutputGrid:
    """The run's grid: the scenes' own, or the CRS, pixel size and area of interest the config chose."""
    chosen = cfg.grid
    if chosen.crs is None and chosen.resolution is None and chosen.aoi is None:
        return grid_from_scenes(scenes)
    try:
        target = chosen.crs or scenes[0].crs
        aoi = aoi_bounds(chosen.aoi, chosen.aoi_crs, target) if chosen.aoi is not None else None
        return chosen_grid(scenes, chosen.crs, chosen.resolution, aoi)
    except (ValueError, OSError) as exc:
        raise RunError(f"grid: {exc}") from None


def run_fingerprint(cfg: RunConfig, model_sha: str, scenes: list[SceneInfo]) -> str:
    """What determines the mosaic's pixels: a changed one must not be mixed with old blocks."""
    return runstate.fingerprint(
        {
            "model": model_sha,
            "tiling": cfg.tiling.model_dump(),
            "block_size": cfg.output.block_size,
            "mosaic_rule": cfg.output.mosaic_rule,
            "scenes": [s.path for s in scenes],
            **({"zarr_format": 2} if cfg.output.zarr_format == 2 else {}),  # v3 runs keep their old fingerprint
            **({"grid": cfg.grid.model_dump()} if cfg.grid != GridConfig() else {}),
            **({"bands": cfg.bands} if cfg.bands else {}),
            **({"mask": cfg.mask.model_dump()} if cfg.mask else {}),
            **({"resampling": cfg.resampling} if cfg.resampling != "bilinear" else {}),
            **({"scaled": True} if any(s.scales for s in scenes) else {}),  # values by the files' scale/offset
        }
    )


@dataclass
class RunPlan:
    """What a run will do, worked out from headers alone before any cluster starts or OUT is written."""

    cfg: RunConfig
    out: str
    ckpt: Checkpoint
    legend: dict[int, str]
    scenes: list[SceneInfo]
    failed_scenes: dict[str, str]
    grid: OutputGrid
    fingerprint: str
    tiling: TilingSettings
    blocks: list[Block]
    footprints: list[Footprint]


def plan_run(cfg: RunConfig) -> RunPlan:
    """Check the checkpoint and the inputs, and fix the grid and the blocks: every error a user can
    cause here comes before a cluster starts (:class:`RunError` or ``CheckpointError``)."""
    try:
        out = storage.absolute(cfg.out)
    except storage.StorageError as exc:
        raise RunError(str(exc)) from None
    if storage.scheme(out) in storage.READ_ONLY:
        raise RunError(f"{out}: {storage.scheme(out)} locations are read-only; give a writable --out")
    ckpt = load_checkpoint(cfg.model.checkpoint)
    legend = {int(c["id"]): c["name"] for c in ckpt.classes}
    if "classes" in cfg.model_fields_set and cfg.class_names() != legend:
        raise RunError(f"{ckpt.path}: the model's classes {legend} do not match the config's {cfg.class_names()}")
    empty_inputs: dict[str, str] = {}
    inputs = list(cfg.inputs)
    search = cfg.stac_search
    if search.url:
        inputs += search_inputs(
            search.url, search.collections, search.bbox, search.datetime, cfg.stac_asset, search.max_items
        )
    scenes, failed_scenes = catalog(
        expand_inputs(inputs, cfg.stac_asset, empty_inputs), len(ckpt.bands), band_selection(cfg, ckpt)
    )
    failed_scenes = {**empty_inputs, **failed_scenes}
    coverage = {s.path: None if s.vrt else data_coverage(s.path) for s in scenes}
    for path, cov in coverage.items():
        if cov is not None and not cov.present.any():
            failed_scenes[path] = "all pixels are nodata (the file stores no data block)"
            log.error("skipping scene %s: %s", path, failed_scenes[path])
    scenes = [s for s in scenes if s.path not in failed_scenes]
    if not scenes:
        raise RunError(
            "no usable input scene: " + "; ".join(f"{p}: {r}" for p, r in failed_scenes.items())
            if failed_scenes
            else "no input scene given"
        )
    dates = input_dates(cfg.inputs, cfg.stac_asset)
    scenes = [replace(s, acquired=dates.get(s.path, s.acquired)) for s in scenes]
    grid = output_grid(cfg, scenes)
    scenes = order_scenes(scenes, cfg.output.mosaic_rule)
    footprints = footprints_on(grid, scenes, coverage)
    tiling = TilingSettings(cfg.tiling.tile_size, cfg.tiling.overlap, cfg.tiling.blend, cfg.output.block_size)
    return RunPlan(
        cfg,
        out,
        ckpt,
        legend,
        scenes,
        failed_scenes,
        grid,
        run_fingerprint(cfg, ckpt.sha256, scenes),
        tiling,
        list(iter_blocks(grid.height, grid.width, cfg.output.block_size)),
        footprints,
    )


def run(cfg: RunConfig, client: Client | None = None) -> RunResult:
    """Run the whole job; connects to (or starts) the cluster from ``cfg.cluster`` unless given one.

    The run holds OUT's lease from before its first write to the end (a second run on OUT is
    refused), and its manifest says ``running`` until every block is committed and the polygons
    are written. A run that fails before committing a block removes the OUT it created.
    """
    plan = plan_run(cfg)
    created = runstate.ensure_output_folder(plan.out)
    with Lease(plan.out, runstate.new_run_id()) as lease:
        try:
            if client is not None:
                return execute(plan, client, lease)
            with dask_client(cfg.cluster) as own:
                return execute(plan, own, lease)
        except Exception:
            # still ours (the lease is held): nothing of value is lost
            if created and not lease.lost_reason and not runstate.committed_blocks(plan.out):
                storage.delete_tree(plan.out)
            raise


def execute(plan: RunPlan, client: Client, lease: Lease) -> RunResult:
    """The run of ``plan`` on ``client``, holding OUT's ``lease``."""
    t0 = time.perf_counter()
    cfg, out, ckpt, grid, scenes, legend = plan.cfg, plan.out, plan.ckpt, plan.grid, plan.scenes, plan.legend
    failed_scenes = dict(plan.failed_scenes)
    reused = prepare_output(out, plan.fingerprint, cfg.output.overwrite, MOSAIC_NAME)
    runstate.mark_running(out, lease.run_id, plan.fingerprint, len(plan.blocks))
    mosaic_path = storage.join(out, MOSAIC_NAME)
    if not reused:
        colors = {int(c["id"]): c.get("color", "#808080") for c in ckpt.classes}
        mosaic.create_mosaic(
            mosaic_path,
            grid,
            cfg.output.block_size,
            legend,
            colors,
            attrs={"model_sha256": ckpt.sha256, "fingerprint": plan.fingerprint},
            zarr_format=cfg.output.zarr_format,
        )
    settings = InferenceSettings(
        storage.absolute(ckpt.path),
        cfg.model.batch_size,
        cfg.model.device,
        cfg.model.amp,
        cfg.model.torch_threads or torch_threads_per_worker(cfg.cluster),
        cfg.model.compile,
    )
    blocks = plan.blocks
    layers = {
        b.key: scene_layers(b, scenes, plan.footprints, plan.tiling.tile_size, cfg.output.mosaic_rule) for b in blocks
    }
    # Blocks no scene reaches with data (outside every footprint, or where a sparse file has no
    # block) are nodata already in the store: no task at all.
    empty = {key for key, scene_sets in layers.items() if not scene_sets}
    todo = [b for b in blocks if reused.get(b.key, {}).get("status") != "done" and b.key not in empty]
    log.info(
        "%d scenes, grid %d x %d px, %d blocks (%d reused, %d without data)",
        len(scenes),
        grid.width,
        grid.height,
        len(blocks),
        len(reused),
        len(empty),
    )
    block_records = {k: {**v, "reused": True} for k, v in reused.items() if v.get("status") == "done"}
    block_records.update(segment_blocks(client, blocks, todo, layers, plan, settings, lease, ckpt.n_classes))
    t_segment = time.perf_counter() - t0
    failed_blocks = {k: v["error"] for k, v in block_records.items() if v["status"] != "done"}
    unused = []
    for scene, reason in empty_scenes(scenes, block_records).items():
        if reason is None:
            unused.append(scene)
        else:
            log.error("scene %s: %s", scene, reason)
            failed_scenes[scene] = reason
    for key, err in failed_blocks.items():
        log.error("block %s failed: %s", key, err)
    if not failed_blocks:  # every reader is done: what a lost worker may have left goes too
        partials.remove_block(storage.join(out, PARTIALS_DIR))

    computed = [r for r in block_records.values() if r["status"] == "done" and not r.get("reused")]
    forward_s = sum(r.get("forward_s", 0.0) for r in computed)
    task_s = sum(r["seconds"] for r in computed)
    if task_s:
        log.info(
            "forward passes: %.0f %% of the blocks' worker time (%.1f of %.1f s)",
            100 * forward_s / task_s,
            forward_s,
            task_s,
        )

    polygons_path = None
    t_vec = 0.0
    if cfg.output.polygons:
        t1 = time.perf_counter()
        with_classes = [b for b in blocks if has_classes(block_records.get(b.key))]
        polygons_path = write_polygons(client, with_classes, grid, out, legend, cfg.vector)
        t_vec = time.perf_counter() - t1

    quicklook = write_quicklook(mosaic_path, storage.join(out, QUICKLOOK_NAME))
    lease.check()
    manifest_loc = storage.join(out, MANIFEST_NAME)
    result = RunResult(out, mosaic_path, polygons_path, manifest_loc, failed_scenes, failed_blocks, quicklook)
    manifest = RunManifest(
        status=runstate.INCOMPLETE if failed_blocks else runstate.FINISHED,
        run_id=lease.run_id,
        geoseg_version=_version(),
        inputs=list(cfg.inputs),
        scenes=[
            SceneRecord(path=s.path, status="unused" if s.path in unused else "ok", acquired=s.acquired)
            for s in scenes
            if s.path not in failed_scenes
        ]
        + [SceneRecord(path=p, status="failed", error=r) for p, r in failed_scenes.items()],
        model=ModelRecord(checkpoint=ckpt.path, sha256=ckpt.sha256, arch=ckpt.arch, bands=ckpt.bands),
        config=cfg.model_dump(mode="json"),
        fingerprint=plan.fingerprint,
        grid={**asdict(grid), "bounds": grid.bounds, "epsg": grid.crs.to_epsg()},
        blocks={k: BlockRecord.model_validate(v) for k, v in sorted(block_records.items())},
        summary=Summary(
            blocks=len(blocks),
            computed=len(todo),
            reused=len(reused),
            without_data=len(empty),
            failed_blocks=len(failed_blocks),
            failed_scenes=len(failed_scenes),
            tiles=sum(int(r.get("tiles", 0)) for r in block_records.values()),
        ),
        timings=Timings(
            forward_s=round(forward_s, 3),
            model_share=round(forward_s / task_s, 3) if task_s else None,
            segment_s=round(t_segment, 3),
            vectorize_s=round(t_vec, 3),
            total_s=round(time.perf_counter() - t0, 3),
        ),
        outputs={"mosaic": mosaic_path, "polygons": polygons_path, "quicklook": quicklook},
    )
    record = manifest.model_dump(mode="json")
    runstate.write_manifest(out, record)
    outputs = [mosaic_path, polygons_path, quicklook, manifest_loc]
    stac_item.write_item(
        out,
        stac_item.run_item(
            out, record, legend, mosaic.read_colors(mosaic_path), [storage.name(loc) for loc in outputs if loc]
        ),
    )
    return result


def worker_slots(client: Client, resources: dict[str, float] | None) -> dict[str, int]:
    """How many step-1 tasks each worker runs at once: its threads, or its units of ``resources``."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    if not resources:
        return {addr: w["nthreads"] for addr, w in workers.items()}
    return {
        addr: min(int(w.get("resources", {}).get(name, 0) // need) for name, need in resources.items())
        for addr, w in workers.items()
    }


def segment_blocks(
    client: Client,
    blocks: list[Block],
    todo: list[Block],
    layers: dict[str, dict[str, list[SceneInfo]]],
    plan: RunPlan,
    settings: InferenceSettings,
    lease: Lease,
    n_classes: int,
) -> dict[str, dict[str, Any]]:
    """Step 1 and step 2 of every block in ``todo`` on the cluster; returns their records.

    Every task is submitted at once and Dask places them: step 1 for the blocks to do and the
    blocks whose tiles reach them, with priorities in :func:`work_order`, and each block's step 2
    right after the last step 1 it needs, so only about one row of blocks has partial results
    in the store at any time; a partial is deleted once every block that reads it is finished.
    Dask's queuing hands step 1 to worker threads as they free up, and to workers that join a
    running job at once. It does not queue tasks that ask for a GPU resource: it places those
    on the GPU workers there are. An own hand-out loop was no more than 2 % faster at 32 blocks
    per worker thread (benchmarks/README.md). ``layers`` are the scenes each block composites
    (:func:`geoseg.blocks.scene_layers`); a block without any has no valid pixel within a tile
    of it: its tiles add no votes anywhere, so it is neither computed nor read. Task keys hold
    the run's id (runs sharing a scheduler never share a task).
    """
    grid, tiling, out, cfg = plan.grid, plan.tiling, plan.out, plan.cfg
    empty = {key for key, scene_sets in layers.items() if not scene_sets}
    by_index = {(b.row, b.col): b for b in blocks}
    order = {b.key: n for n, b in enumerate(work_order(blocks, grid, tiling))}
    tg, sup, size = tiling.grid, tiling.support, tiling.block_size
    reach = {  # the block itself first: its step 1 holds the interior
        b.key: [b]
        + [
            by_index[(r, c)]
            for r in reaching_blocks(tg, b.row, size, grid.height, sup)
            for c in reaching_blocks(tg, b.col, size, grid.width, sup)
            if (r, c) != (b.row, b.col) and by_index[(r, c)].key not in empty
        ]
        for b in todo
    }
    needed = sorted({n.key: n for b in todo for n in reach[b.key]}.values(), key=lambda n: order[n.key])
    readers: dict[str, int] = {}
    for b in todo:
        for n in reach[b.key]:
            readers[n.key] = readers.get(n.key, 0) + 1
    tag = f"{plan.fingerprint}-{lease.run_id}"
    resources = {"GPU": 1} if cfg.cluster.gpu_resource else None
    slots = worker_slots(client, resources)
    if resources and slots and not any(slots.values()):  # the blocks would wait forever
        raise RunError(
            f"cluster.gpu_resource is set, but none of the cluster's {len(slots)} workers declares a GPU: "
            "start them with `dask worker ... --resources GPU=1`"
        )

    predict = partial(
        predict_task, grid=grid, tiling=tiling, settings=settings, out=str(out), read_threads=cfg.cluster.read_threads
    )
    finish = partial(finish_task, n_classes=n_classes, out=str(out), run_id=lease.run_id)
    graph = block_graph(needed, todo, reach, order, layers, predict, finish, tag, resources)
    # One submission: the scheduler sees every step 1 at once and queues them (it assigns the
    # first few of a group submitted task by task before it knows the group is large).
    step2 = client.compute(graph, optimize_graph=False)

    records: dict[str, dict[str, Any]] = {}
    for fut in track(as_completed(step2), total=len(todo), description="segmenting blocks"):
        lease.check()
        rec = fut.result()
        key = rec.pop("block")
        records[key] = rec
        fut.release()
        for n in reach[key]:
            readers[n.key] -= 1
            if readers[n.key] == 0:
                partials.remove_block(storage.join(out, PARTIALS_DIR, n.key))
    return records


def stream_polygons(
    client: Client,
    blocks: list[Block],
    grid: OutputGrid,
    out: str,
    legend: dict[int, str],
    writers: list[tuple[LayerWriter, str | None]],
    vector: VectorConfig,
    task: Callable[..., vectorize.BlockPolygons] | None = None,
    finish: Callable[[gpd.GeoDataFrame], gpd.GeoDataFrame] | None = None,
) -> int:
    """Polygonize per block on the workers and write polygons as blocks finish; returns the polygon count.

    All the work is the workers': each block's polygons, their rows, and the merge of the
    pieces cut by block edges (one task per group of classes, ``MERGE_GROUPS`` at most). The
    client only writes: a block's finished polygons at once, in block order (so reruns give
    the same file), then the merged ones group by group. Each writer gets the polygons in the
    mosaic CRS, or reprojected to the CRS paired with it. ``task(block, out, grid, vector)``
    polygonizes a block (default: the class mosaic's); ``finish`` adapts each batch's columns
    before it is written.
    """
    stamp = time.time_ns()
    task = task or polygonize_task
    crs, tolerance = grid.crs_wkt, vector.simplify_tolerance
    parts = [client.submit(task, b, str(out), grid, vector, key=f"polygonize-{b.key}-{stamp}") for b in blocks]
    finals = [
        client.submit(vectorize.final_layer, part, crs, legend, tolerance, key=f"polygons-{b.key}-{stamp}")
        for b, part in zip(blocks, parts, strict=True)
    ]
    # fixed, not from the cluster's size: with simplification, a group is simplified as a batch
    groups = max(1, min(len(legend), MERGE_GROUPS))
    merged = []
    for g in range(groups):
        pieces = [
            client.submit(vectorize.edge_pieces, part, groups, g, key=f"edge-pieces-{g}-{b.key}-{stamp}")
            for b, part in zip(blocks, parts, strict=True)
        ]
        merged.append(
            client.submit(
                vectorize.merged_layer, grid.affine, crs, legend, tolerance, *pieces, key=f"merged-polygons-{g}-{stamp}"
            )
        )
    del parts  # the workers drop each block's pieces once nothing needs them
    order = {fut.key: i for i, fut in enumerate(finals + merged)}
    ready: dict[int, gpd.GeoDataFrame] = {}
    next_layer = 0
    count = 0
    for fut in track(as_completed(finals + merged), total=len(order), description="vectorizing blocks"):
        ready[order[fut.key]] = fut.result()
        fut.release()
        while next_layer in ready:
            gdf = ready.pop(next_layer)
            next_layer += 1
            if finish is not None:
                gdf = finish(gdf)
            for writer, to_crs in writers:
                writer.write(gdf if to_crs is None else gdf.to_crs(to_crs))
            count += len(gdf)
    for writer, _ in writers:
        writer.close()
    return count


def empty_scenes(scenes: list[SceneInfo], records: dict[str, dict]) -> dict[str, str | None]:
    """Scenes that gave no pixel: all nodata (an error), or never read as earlier scenes covered them (None)."""
    valid: dict[str, int] = {}
    filled: dict[str, int] = {}
    for rec in records.values():
        for path, (n_valid, n_filled) in rec.get("scene_valid_pixels", {}).items():
            valid[path] = valid.get(path, 0) + n_valid
            filled[path] = filled.get(path, 0) + n_filled
    if any(rec.get("status") == "done" and "scene_valid_pixels" not in rec for rec in records.values()):
        return {}  # blocks from an older run carry no counts: no verdict
    verdicts: dict[str, str | None] = {}
    for s in scenes:
        if s.path in valid and valid[s.path] == 0:
            verdicts[s.path] = "all pixels are nodata"
        elif filled.get(s.path, 0) == 0:
            verdicts[s.path] = None
    return verdicts


def write_polygons(
    client: Client,
    blocks: list[Block],
    grid: OutputGrid,
    out: str,
    legend: dict[int, str],
    vector: VectorConfig,
) -> str:
    """The run's polygons as one GeoPackage layer."""
    path = storage.join(out, POLYGONS_NAME)
    count = stream_polygons(client, blocks, grid, out, legend, [(LayerWriter(path, grid.crs_wkt), None)], vector)
    log.info("%d polygons -> %s", count, path)
    return path


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("geoseg")
    except PackageNotFoundError:
        return "unknown"
