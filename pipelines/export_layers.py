"""Batch job: GIS layers from a finished run.

OUT/classes.tif (COG), OUT/polygons.{gpkg,parquet,fgb} (+ a reprojected copy on request),
OUT/classes.qml, OUT/polygons.qml, OUT/polygons.sld, OUT/quicklook.png, OUT/report.{json,md}
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from distributed import Client

from geoseg import export, mosaic, runstate, stac_item, storage
from geoseg.blocks import MOSAIC_NAME, has_classes
from geoseg.cluster import dask_client
from geoseg.config import RunConfig
from geoseg.quicklook import write_quicklook
from geoseg.runstate import Lease
from geoseg.tiling import Block, iter_blocks
from geoseg.vector_io import LayerWriter, write_flatgeobuf
from pipelines.segment_scenes import stream_polygons

log = logging.getLogger(__name__)
SUFFIX = {"gpkg": ".gpkg", "parquet": ".parquet", "fgb": ".fgb"}


@dataclass
class ExportResult:
    files: dict[str, str] = field(default_factory=dict)


def run_config_of(out: str, overrides: list[str]) -> RunConfig:
    """The config a finished run recorded in its manifest, with ``--set`` overrides applied;
    an unfinished run is a ``RunError`` saying what is missing."""
    from pydantic import ValidationError

    from geoseg.config import ConfigError, apply_overrides, format_validation_error

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


def blocks_with_classes(manifest: dict, block_size: int, blocks: list[Block]) -> list[Block]:
    """The blocks (of ``block_size``) a finished run's manifest says hold a class: the others have
    no polygon. Blocks of another size than the run's cannot be told apart: all of them."""
    if manifest.get("config", {}).get("output", {}).get("block_size") != block_size:
        return blocks
    records = manifest.get("blocks", {})
    return [b for b in blocks if has_classes(records.get(b.key))]


def export_layers(out: str, cfg: RunConfig, client: Client, manifest: dict) -> ExportResult:
    def at(name: str) -> str:
        return storage.join(out, name)

    mosaic_path = at(MOSAIC_NAME)
    grid = mosaic.read_grid(mosaic_path)
    legend = mosaic.read_legend(mosaic_path)
    colors = mosaic.read_colors(mosaic_path) or {k: "#808080" for k in legend}
    result = ExportResult()
    result.files["cog"] = export.write_cog(mosaic_path, at("classes.tif"), legend, colors)
    size = cfg.output.block_size
    blocks = blocks_with_classes(manifest, size, list(iter_blocks(grid.height, grid.width, size)))
    targets: list[tuple[str, str | None]] = [("", None)]
    if cfg.vector.reproject_to:
        targets.append(("_" + cfg.vector.reproject_to.replace(":", "").lower(), cfg.vector.reproject_to))
    writers = []
    for tag, crs in targets:
        # FlatGeobuf cannot grow: it is converted from the GeoPackage at the end.
        for suffix in {".gpkg"} | {SUFFIX[f] for f in cfg.vector.formats if f == "parquet"}:
            writers.append((LayerWriter(at(f"polygons{tag}{suffix}"), crs or grid.crs_wkt), crs))
    count = stream_polygons(client, blocks, grid, out, legend, writers, cfg.vector)
    for tag, _ in targets:
        if "fgb" in cfg.vector.formats:
            write_flatgeobuf(at(f"polygons{tag}.gpkg"), at(f"polygons{tag}.fgb"))
        for fmt in cfg.vector.formats:
            result.files[f"{fmt}{tag}"] = at(f"polygons{tag}{SUFFIX[fmt]}")
    styles = {
        "qml_raster": ("classes.qml", export.raster_qml(legend, colors)),
        "qml_vector": ("polygons.qml", export.vector_qml(legend, colors)),
        "sld": ("polygons.sld", export.vector_sld(legend, colors)),
    }
    for key, (name, text) in styles.items():
        storage.write_text(at(name), text)
        result.files[key] = at(name)
    result.files["quicklook"] = write_quicklook(mosaic_path, at("quicklook.png"))
    report = export.area_report(export.class_histogram(mosaic_path), grid, legend)
    report["polygons"] = count
    storage.write_text(at("report.json"), json.dumps(report, indent=2))
    storage.write_text(at("report.md"), export.report_markdown(report, f"Land cover of {storage.name(out)}"))
    result.files.update(report_json=at("report.json"), report_md=at("report.md"))
    # the gpkg a FlatGeobuf was converted from is an output too
    names = sorted(
        {storage.name(loc) for loc in result.files.values()}
        | {f"polygons{t}.gpkg" for t, _ in targets}
        | {storage.name(result.files["cog"]) + ".aux.xml"}  # the COG's category names
    )
    result.files["item"] = stac_item.add_assets(out, manifest, legend, colors, names)
    log.info("%d polygons; layers in %s", count, out)
    return result
