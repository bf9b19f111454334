"""A run's plan, from the config and the files' headers alone: the checkpoint, the scenes, the
output grid, the blocks and the fingerprint. Every error a user can cause with inputs comes from
here, before a cluster starts or OUT is written."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from geoseg import runstate, storage
from geoseg.blocks import Footprint, footprints_on
from geoseg.catalog import ItemOrigin, catalog, expand_inputs, order_scenes, search_inputs
from geoseg.config import GridConfig, RunConfig
from geoseg.grid import OutputGrid, aoi_bounds, chosen_grid, grid_from_scenes
from geoseg.models.checkpoint import Checkpoint, load_checkpoint
from geoseg.runstate import RunError
from geoseg.scenes import BandSelection, SceneInfo, data_coverage
from geoseg.segment import TilingSettings
from geoseg.tiling import Block, iter_blocks

log = logging.getLogger(__name__)


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


def run_fingerprint(cfg: RunConfig, model_sha: str, scenes: list[SceneInfo], grid: OutputGrid) -> str:
    """What determines the mosaic's pixels: a changed one must not be mixed with old blocks. A
    chosen grid counts as it came out (an area of interest's file may change under its name)."""
    return runstate.fingerprint(
        {
            "model": model_sha,
            "tiling": cfg.tiling.model_dump(),
            "block_size": cfg.output.block_size,
            "mosaic_rule": cfg.output.mosaic_rule,
            # a signed URL signed again is the same scene: a run on expiring URLs resumes
            "scenes": [storage.unsigned(s.path) for s in scenes],
            **({"zarr_format": 2} if cfg.output.zarr_format == 2 else {}),  # v3 runs keep their old fingerprint
            **(
                {
                    "grid": cfg.grid.model_dump(),
                    # the CRS by its code where it has one (a WKT's text changes with PROJ's version)
                    "output_grid": [grid.crs.to_epsg() or grid.crs_wkt, list(grid.transform), grid.width, grid.height],
                }
                if cfg.grid != GridConfig()
                else {}
            ),
            **({"bands": cfg.bands} if cfg.bands else {}),
            **({"mask": cfg.mask.model_dump()} if cfg.mask else {}),
            **({"resampling": cfg.resampling} if cfg.resampling != "bilinear" else {}),
            **({"scaled": True} if any(s.scales for s in scenes) else {}),  # values by the files' scale/offset
        }
    )


def with_numerics(plan: RunPlan, numerics: str) -> RunPlan:
    """``plan`` with its workers' numerics (:func:`geoseg.inference.numerics`) in its fingerprint:
    votes from a GPU, with AMP or compiled, are not a CPU's and must not be summed with them.
    Runs on CPU (not compiled) keep the fingerprint they always had."""
    if numerics == "cpu":
        return replace(plan, numerics=numerics)
    fingerprint = runstate.fingerprint({"run": plan.fingerprint, "numerics": numerics})
    return replace(plan, fingerprint=fingerprint, numerics=numerics)


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
    numerics: str | None = None  # how the workers compute votes, once asked (:func:`with_numerics`)


def plan_run(cfg: RunConfig) -> RunPlan:
    """Check the checkpoint and the inputs, and fix the grid and the blocks: every error a user can
    cause here comes before a cluster starts (:class:`RunError` or ``CheckpointError``)."""
    try:
        out = storage.writable_output(cfg.out)
    except storage.StorageError as exc:
        raise RunError(str(exc)) from None
    ckpt = load_checkpoint(cfg.model.checkpoint, weights=False)  # the workers load the weights
    legend = {int(c["id"]): c["name"] for c in ckpt.classes}
    if "classes" in cfg.model_fields_set and cfg.class_names() != legend:
        raise RunError(f"{ckpt.path}: the model's classes {legend} do not match the config's {cfg.class_names()}")
    empty_inputs: dict[str, str] = {}
    origins: dict[str, ItemOrigin] = {}  # the STAC items scenes come from, with their acquisition times
    inputs = list(cfg.inputs)
    search = cfg.stac_search
    if search.url:
        inputs += search_inputs(
            search.url, search.collections, search.bbox, search.datetime, cfg.stac_asset, search.max_items, origins
        )
    scenes, failed_scenes = catalog(
        expand_inputs(inputs, cfg.stac_asset, empty_inputs, origins),
        len(ckpt.bands),
        band_selection(cfg, ckpt),
        origins,
    )
    failed_scenes = {**empty_inputs, **failed_scenes}
    remote = any(storage.is_url(s.path) for s in scenes)
    found = storage.concurrently(lambda s: None if s.vrt else data_coverage(s.path), scenes, remote)
    coverage = {s.path: cov for s, cov in zip(scenes, found, strict=True)}
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
        run_fingerprint(cfg, ckpt.sha256, scenes, grid),
        tiling,
        list(iter_blocks(grid.height, grid.width, cfg.output.block_size)),
        footprints,
    )
