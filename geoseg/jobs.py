"""The batch jobs the CLI runs, each a short composition of the stages under OUT's lease:

    run:       plan (headers) -> segmentation (block graph) -> polygons -> quicklook, manifest, item
    export:    a finished run -> GIS layers (:mod:`geoseg.export`)
    vectorize: a finished run -> its polygons again, with other vector settings
    change:    two finished runs -> change store, matrix and polygons (:mod:`geoseg.transitions`)

Each connects to (or starts) the cluster in the config unless it is given a client.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from distributed import Client, Future
from pydantic import ValidationError

from geoseg import mosaic, partials, runstate, stac_item, storage
from geoseg.blocks import PARTIALS_DIR, has_classes, polygon_halo, polygonize_task, scene_layers, sieve_reach
from geoseg.cluster import dask_client, torch_threads_per_worker
from geoseg.config import (
    ChangeConfig,
    ConfigError,
    InferenceSettings,
    RunConfig,
    apply_overrides,
    format_validation_error,
    load_config,
)
from geoseg.export import ExportResult, export_layers
from geoseg.manifest import BlockRecord, ModelRecord, RunManifest, SceneRecord, Summary, Timings
from geoseg.mosaic import MOSAIC_NAME
from geoseg.polygons import (
    LayerSink,
    announce_layers,
    asked_layers,
    blocks_with_classes,
    layer_files,
    layer_outputs,
    layer_task,
    record_layers,
    remove_layers,
    stale_layers,
    submit_layers,
    submit_parts,
    write_polygons,
)
from geoseg.quicklook import import_plotting, write_quicklook
from geoseg.runstate import MANIFEST_NAME, Lease, RunError, prepare_output
from geoseg.tiling import iter_blocks
from geoseg.transitions import ChangeResult, change_runs

if TYPE_CHECKING:  # the run's own stages import torch: export, vectorize and change start without it
    from geoseg.planning import RunPlan
    from geoseg.segmentation import SubmittedBlocks

log = logging.getLogger(__name__)

QUICKLOOK_NAME = "quicklook.png"
__all__ = [
    "ChangeResult",
    "ExportResult",
    "RunError",
    "RunResult",
    "change_dates",
    "export_run",
    "run",
    "run_change",
    "vectorize_run",
]


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


def run(cfg: RunConfig, client: Client | None = None) -> RunResult:
    """Run the whole job; connects to (or starts) the cluster from ``cfg.cluster`` unless given one.

    The run holds OUT's lease from before its first write to the end (a second run on OUT is
    refused), and its manifest says ``running`` until every block is committed and the polygons
    are written. A run that fails before committing a block removes the OUT it created.
    """
    from geoseg.planning import plan_run

    plan = plan_run(cfg)
    created = runstate.ensure_output_folder(plan.out)
    with Lease(plan.out, runstate.new_run_id()) as lease, removed_unless_committed(plan.out, created, lease):
        if client is not None:
            return execute(plan, client, lease)
        with dask_client(cfg.cluster) as own:
            return execute(plan, own, lease)


@contextmanager
def removed_unless_committed(out: str, created: bool, lease: Lease) -> Iterator[None]:
    """An error in the block, or a stop (SIGTERM, Ctrl-C), before the first committed block
    removes ``out`` where this job ``created`` it: still ours (the ``lease`` is held), and
    nothing of value is lost."""
    try:
        yield
    except BaseException:
        if created and not lease.lost_reason and not runstate.committed_blocks(out):
            storage.delete_tree(out)
        raise


def execute(plan: RunPlan, client: Client, lease: Lease) -> RunResult:
    """The run of ``plan`` on ``client``, holding OUT's ``lease``."""
    from geoseg.planning import with_numerics
    from geoseg.segmentation import (
        check_workers_see_output,
        collect_blocks,
        empty_scenes,
        step_one_resources,
        submit_blocks,
        workers_numerics,
    )

    t0 = time.perf_counter()
    cfg, out, ckpt, grid, scenes = plan.cfg, plan.out, plan.ckpt, plan.grid, plan.scenes
    failed_scenes = dict(plan.failed_scenes)
    settings = InferenceSettings(
        storage.absolute(ckpt.path),
        cfg.model.batch_size,
        cfg.model.device,
        cfg.model.amp,
        cfg.model.torch_threads or torch_threads_per_worker(cfg.cluster),
        cfg.model.compile,
    )
    plan = with_numerics(plan, workers_numerics(client, settings, step_one_resources(cfg.cluster)))
    check_workers_see_output(client, str(out), lease.run_id)
    # the layers a previous run left, and this run's: named in the running manifest, so that
    # whichever run finishes removes those no longer asked for, though this one be killed
    known = {k: v for k, v in runstate.recorded_outputs(out).items() if k.startswith("polygons") and v}
    if cfg.output.polygons:
        known |= asked_layers(out, cfg.vector)
    reused, all_overviews = start_output(plan, lease, known)
    mosaic_path = storage.join(out, MOSAIC_NAME)
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
    polygonize = None
    if cfg.output.polygons:
        polygonize = layer_task(
            partial(polygonize_task, out=str(out), grid=grid, vector=cfg.vector, run_id=lease.run_id),
            grid.crs_wkt,
            plan.legend,
            cfg.vector,
        )
    submitted = submit_blocks(
        client, blocks, todo, layers, plan, settings, lease, ckpt.n_classes, polygonize, block_records, all_overviews
    )
    layers = polygon_tasks(client, plan, block_records, submitted, lease.run_id) if cfg.output.polygons else []
    storage.in_background(import_plotting)  # while the blocks run, not after the last one
    sink, files, drawing = None, None, None
    try:
        if cfg.output.polygons:
            files = layer_files(out, grid.crs_wkt, cfg.vector)
            sink = LayerSink(layers, files.writers)
        del layers
        block_records.update(collect_blocks(submitted, out, lease, sink))
        # the quicklook is drawn while the layers are finished (a GeoPackage's spatial index, the uploads)
        drawing = storage.in_background(write_quicklook, mosaic_path, storage.join(out, QUICKLOOK_NAME))
        count = sink.close() if sink is not None else 0
        # the polygons' share after the last block: the last blocks' polygons, the merge, the writes
        t_segment, t_vec = submitted.finished_at - t0, time.perf_counter() - submitted.finished_at
    except BaseException as exc:
        if sink is not None:
            sink.abort()
        if drawing is not None and isinstance(exc, Exception):  # an error, not a stop: no thread left writing
            drawing.exception()
        raise
    del submitted
    if files is not None:
        log.info("%d polygons -> %s", count, ", ".join(files.files.values()))
    failed_blocks = {k: v["error"] for k, v in block_records.items() if v["status"] != "done"}
    unused = []
    for scene, reason in empty_scenes(scenes, block_records).items():
        if reason is None:
            unused.append(scene)
        else:
            log.error("scene %s: %s", scene, reason)
            failed_scenes[scene] = reason
    # every reader is done: what a lost worker may have left goes too, beside the quicklook
    leftovers = None if failed_blocks else storage.in_background(partials.discard, storage.join(out, PARTIALS_DIR))

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

    quicklook = drawing.result()
    if leftovers is not None:
        leftovers.result()
    lease.check()
    polygons_path = files.gpkg if files is not None else None
    outputs = {"mosaic": mosaic_path, **layer_outputs(files), "quicklook": quicklook}
    summary = Summary(
        blocks=len(blocks),
        computed=len(todo),
        reused=len(reused),
        without_data=len(empty),
        failed_blocks=len(failed_blocks),
        failed_scenes=len(failed_scenes),
        tiles=sum(int(r.get("tiles", 0)) for r in block_records.values()),
    )
    timings = Timings(
        forward_s=round(forward_s, 3),
        model_share=round(forward_s / task_s, 3) if task_s else None,
        segment_s=round(t_segment, 3),
        vectorize_s=round(t_vec, 3),
        total_s=round(time.perf_counter() - t0, 3),
    )
    manifest = run_manifest(plan, lease.run_id, block_records, failed_scenes, unused, summary, timings, outputs)
    manifest_loc = finish_output(plan, manifest)
    remove_layers(out, stale_layers(known, files))
    return RunResult(out, mosaic_path, polygons_path, manifest_loc, failed_scenes, failed_blocks, quicklook)


def start_output(
    plan: RunPlan, lease: Lease, layers: dict[str, str | None] | None = None
) -> tuple[dict[str, dict[str, Any]], bool]:
    """OUT made ready for ``plan``: a changed run's blocks dropped, the manifest saying
    ``running`` (naming ``layers``, the polygon layers that may lie in OUT), the mosaic created
    unless blocks are reused; the reused blocks' records, and whether every overview chunk must
    be written (blocks reused from a run that did not finish: which chunks it wrote is not known)."""
    cfg, ckpt = plan.cfg, plan.ckpt
    reused = prepare_output(plan.out, plan.fingerprint, cfg.output.overwrite, MOSAIC_NAME)
    finished = bool(reused) and runstate.finished_before(plan.out)
    runstate.mark_running(plan.out, lease.run_id, plan.fingerprint, len(plan.blocks), layers or {})
    if not reused:
        mosaic.create_mosaic(
            storage.join(plan.out, MOSAIC_NAME),
            plan.grid,
            cfg.output.block_size,
            plan.legend,
            {int(c["id"]): c.get("color", "#808080") for c in ckpt.classes},
            attrs={"model_sha256": ckpt.sha256, "fingerprint": plan.fingerprint},
            zarr_format=cfg.output.zarr_format,
        )
    return reused, bool(reused) and not finished


def run_manifest(
    plan: RunPlan,
    run_id: str,
    block_records: dict[str, dict[str, Any]],
    failed_scenes: dict[str, str],
    unused: list[str],
    summary: Summary,
    timings: Timings,
    outputs: dict[str, str | None],
) -> RunManifest:
    """What a run did, as its manifest records it."""
    ckpt, grid = plan.ckpt, plan.grid
    return RunManifest(
        status=runstate.INCOMPLETE if summary.failed_blocks else runstate.FINISHED,
        run_id=run_id,
        geoseg_version=_version(),
        inputs=list(plan.cfg.inputs),
        scenes=[
            SceneRecord(path=s.path, status="unused" if s.path in unused else "ok", acquired=s.acquired)
            for s in plan.scenes
            if s.path not in failed_scenes
        ]
        + [SceneRecord(path=p, status="failed", error=r) for p, r in failed_scenes.items()],
        model=ModelRecord(checkpoint=ckpt.path, sha256=ckpt.sha256, arch=ckpt.arch, bands=ckpt.bands),
        config=plan.cfg.model_dump(mode="json"),
        fingerprint=plan.fingerprint,
        grid={**asdict(grid), "bounds": grid.bounds, "epsg": grid.crs.to_epsg()},
        blocks={k: BlockRecord.model_validate(v) for k, v in sorted(block_records.items())},
        summary=summary,
        timings=timings,
        outputs=outputs,
    )


def finish_output(plan: RunPlan, manifest: RunManifest) -> str:
    """The manifest, then the run's STAC item naming every output; the manifest's location."""
    record = manifest.model_dump(mode="json")
    runstate.write_manifest(plan.out, record)
    manifest_loc = storage.join(plan.out, MANIFEST_NAME)
    names = [storage.name(loc) for loc in [*manifest.outputs.values(), manifest_loc] if loc]
    colors = mosaic.read_colors(storage.join(plan.out, MOSAIC_NAME))
    stac_item.write_item(plan.out, stac_item.run_item(plan.out, record, plan.legend, colors, names))
    return manifest_loc


def polygon_tasks(
    client: Client, plan: RunPlan, records: dict[str, dict[str, Any]], submitted: SubmittedBlocks, run_id: str
) -> list[Future]:
    """The run's polygon layer as tasks: each block to do is polygonized on the workers as soon
    as it (and what its sieve reads) is final, while other blocks are segmented; a reused block
    at once, or once the blocks to do that its sieve reads are final."""
    blocks, grid, vector = plan.blocks, plan.grid, plan.cfg.vector
    reused = [b for b in blocks if has_classes(records.get(b.key))]
    by_index, halo = {(b.row, b.col): b for b in blocks}, polygon_halo(vector)
    after = {
        b.key: [records[b.key]]
        + [
            submitted.step2_of[n.key]
            for n in sieve_reach(b, by_index, halo, plan.cfg.output.block_size)[1:]
            if n.key in submitted.step2_of
        ]
        for b in reused
    }
    part_of = {
        b.key: part
        for b, part in submit_parts(client, reused, plan.out, grid, vector, plan.legend, after=after, run_id=run_id)
    }
    part_of.update(submitted.parts)
    parts = [(b, part_of[b.key]) for b in blocks if b.key in part_of]
    return submit_layers(client, parts, grid, plan.legend, vector)


def run_config_of(out: str, overrides: list[str]) -> RunConfig:
    """The config a finished run recorded in its manifest, with ``--set`` overrides applied;
    an unfinished run is a ``RunError`` saying what is missing."""
    data = runstate.read_finished_manifest(out)["config"]
    try:
        return RunConfig.model_validate(apply_overrides(data, overrides))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "--set")) from None


def export_run(out: str, cfg: RunConfig, client: Client | None = None) -> ExportResult:
    """Write every layer of a finished run in ``out``, holding its lease (no run may write it meanwhile)."""
    out = storage.absolute(out)
    runstate.read_finished_manifest(out)  # before a lease is taken on what is not a run
    with Lease(out, runstate.new_run_id()):
        manifest = runstate.read_finished_manifest(out)  # again, now that no run can change it
        if client is not None:
            return export_layers(out, cfg, client, manifest)
        with dask_client(cfg.cluster) as own:
            return export_layers(out, cfg, own, manifest)


def run_change(run_a: str, run_b: str, out: str, cfg: ChangeConfig, client: Client | None = None) -> ChangeResult:
    """Change between two finished runs into ``out``, held by this run's lease throughout.

    The two runs are not locked (several change jobs may read one run); that each is the same
    finished run at the end as at the start is checked instead."""
    run_a, run_b, out = (storage.absolute(loc) for loc in (run_a, run_b, out))
    for run in (run_a, run_b):  # its own state and outputs would be replaced
        if storage.is_within(out, run):
            raise RunError(f"{out}: is the run {run} or inside it; give the change an output folder of its own")
    before = [runstate.read_finished_manifest(r)["run_id"] for r in (run_a, run_b)]
    created = runstate.ensure_output_folder(out)
    with Lease(out, runstate.new_run_id()) as lease, removed_unless_committed(out, created, lease):
        if client is not None:
            result = change_runs(run_a, run_b, out, cfg, client, lease.run_id)
        else:
            with dask_client(cfg.cluster) as own:
                result = change_runs(run_a, run_b, out, cfg, own, lease.run_id)
    for run, run_id in zip((run_a, run_b), before, strict=True):
        if runstate.read_finished_manifest(run)["run_id"] != run_id:
            raise RunError(f"{run}: was run again while the change was computed; compute the change again")
    return result


def change_dates(cfg: ChangeConfig, out: str) -> ChangeResult:
    """Segment ``date_a`` and ``date_b`` into ``out/date_a`` and ``out/date_b`` with one run
    config, then their change into ``out``, all on one cluster: the change config's where it
    sets one, else the run config's (the segmentation is the heavy part)."""
    dates = {
        name: load_config(cfg.run_config, values={"inputs": list(scenes), "out": storage.join(out, name)})
        for name, scenes in (("date_a", cfg.date_a), ("date_b", cfg.date_b))
    }
    cluster = cfg.cluster if "cluster" in cfg.model_fields_set else dates["date_a"].cluster
    with dask_client(cluster) as client:
        runs = []
        for name, run_cfg in dates.items():
            # the cluster in use sizes the workers' torch threads and says where step 1 runs
            result = run(run_cfg.model_copy(update={"cluster": cluster}), client)
            if not result.ok:
                raise RunError(f"segmenting {name} failed: {result.failed_scenes or result.failed_blocks}")
            runs.append(result.out)
        return run_change(runs[0], runs[1], out, cfg, client)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("geoseg")
    except PackageNotFoundError:
        return "unknown"


def vectorize_run(out: str, cfg: RunConfig, client: Client | None = None) -> str:
    """A finished run's polygons written again (e.g. with another ``vector.mmu_pixels``), holding its lease."""
    out = storage.absolute(out)
    runstate.read_finished_manifest(out)  # before a lease is taken on what is not a run
    with Lease(out, runstate.new_run_id()):
        manifest = runstate.read_finished_manifest(out)  # again, now that no run can change it
        store = storage.join(out, MOSAIC_NAME)
        grid = mosaic.read_grid(store)
        size = cfg.output.block_size
        blocks = blocks_with_classes(manifest, size, list(iter_blocks(grid.height, grid.width, size)))
        legend = mosaic.read_legend(store)
        manifest = announce_layers(out, manifest, cfg.vector)
        if client is not None:
            files, _ = write_polygons(client, blocks, grid, out, legend, cfg.vector)
        else:
            with dask_client(cfg.cluster) as own:
                files, _ = write_polygons(own, blocks, grid, out, legend, cfg.vector)
        dropped = record_layers(out, manifest, cfg.vector, files)
        colors = mosaic.read_colors(store) or {k: "#808080" for k in legend}
        names = [storage.name(loc) for loc in files.files.values()]
        stac_item.add_assets(out, manifest, legend, colors, names, dropped)
        return files.gpkg
