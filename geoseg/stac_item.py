"""A STAC 1.1 Item per run (``OUT/item.json``): where the outputs are, what they cover, how they were made.

Built with pystac from what a finished run records (its manifest, the mosaic's legend and
colours): the footprint and bbox in lon/lat, datetimes from the inputs' acquisitions, the
projection extension (code, shape, transform), one asset per output with its media type and
roles, href relative to the item, the classification extension's classes on the assets that
hold classes, and the processing extension with the model (architecture, bands, checkpoint
checksum) and geoseg's version. ``geoseg export`` adds the assets it writes.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime
from typing import Any

import pystac
import shapely
from pystac.extensions.classification import Classification, ClassificationExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.utils import str_to_datetime
from rasterio.warp import transform_geom

from geoseg import storage
from geoseg.grid import OutputGrid

log = logging.getLogger(__name__)

ITEM_NAME = "item.json"
PROCESSING_SCHEMA = "https://stac-extensions.github.io/processing/v1.2.0/schema.json"
COG = "image/tiff; application=geotiff; profile=cloud-optimized"
MEDIA_TYPES = {  # by suffix
    ".zarr": "application/vnd+zarr",
    ".tif": COG,
    ".gpkg": "application/geopackage+sqlite3",
    ".parquet": "application/vnd.apache.parquet",
    ".fgb": "application/vnd.flatgeobuf",
    ".png": "image/png",
    ".json": "application/json",
    ".md": "text/markdown",
    ".csv": "text/csv",
    ".xml": "application/xml",
    ".qml": "text/xml",
    ".sld": "application/vnd.ogc.sld+xml",
}
CLASS_SUFFIXES = (".zarr", ".tif", ".gpkg", ".parquet", ".fgb")  # assets that hold classes


def asset_for(name: str, legend: dict[int, str], colors: dict[int, str]) -> pystac.Asset:
    """An asset for the output file ``name`` (relative to OUT), typed by its suffix."""
    suffix = "." + name.rsplit(".", 1)[-1] if "." in name else ""
    if suffix == ".png":
        roles = ["overview", "visual"]
    elif suffix in CLASS_SUFFIXES:
        roles = ["data"]
    else:
        roles = ["metadata"]
    asset = pystac.Asset(href=f"./{name}", media_type=MEDIA_TYPES.get(suffix), roles=roles, title=name)
    if suffix in CLASS_SUFFIXES and legend:
        ClassificationExtension.ext(asset, add_if_missing=False).classes = class_list(legend, colors)
    return asset


def class_list(legend: dict[int, str], colors: dict[int, str]) -> list[Classification]:
    """The legend as classification classes; ``name`` is the extension's token, ``description`` as given."""
    return [
        Classification.create(
            value=value,
            name=re.sub(r"[^0-9A-Za-z_-]+", "_", legend[value]) or str(value),
            description=legend[value],
            color_hint=colors[value].lstrip("#").upper() if value in colors else None,
        )
        for value in sorted(legend)
    ]


def footprint_lonlat(grid: OutputGrid) -> dict[str, Any]:
    """The grid's extent in lon/lat, its edges densified so that the reprojected outline stays true."""
    west, south, east, north = grid.bounds
    outline = shapely.segmentize(shapely.box(west, south, east, north), max(east - west, north - south) / 32)
    return transform_geom(grid.crs, "EPSG:4326", shapely.geometry.mapping(outline), precision=7)


def acquisition_times(manifest: dict[str, Any]) -> list[datetime]:
    """When the scenes the mosaic was made of were acquired, in UTC (a date without a zone is
    taken as UTC); a date that does not parse is left out, with a warning."""
    times = []
    for scene in manifest.get("scenes", []):
        if not scene.get("acquired"):
            continue
        try:
            when = str_to_datetime(scene["acquired"])
        except ValueError:
            log.warning(
                "%s: acquisition time %r is not ISO 8601: left out of the item", scene["path"], scene["acquired"]
            )
            continue
        times.append(when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC))
    return sorted(times)


def run_item(
    out: str,
    manifest: dict[str, Any],
    legend: dict[int, str],
    colors: dict[int, str],
    names: list[str],
    lineage: str | None = None,
    made: datetime | None = None,
) -> pystac.Item:
    """The Item of the run in ``out`` with one asset per output file in ``names`` (relative to
    OUT); ``lineage`` says how the outputs were made (default: a segmentation run's words).
    Without acquisition times the item's datetime is when it was made (``made``, default now)."""
    g = manifest["grid"]
    grid = OutputGrid(g["crs_wkt"], tuple(g["transform"]), g["width"], g["height"])
    geometry = footprint_lonlat(grid)
    times = acquisition_times(manifest)
    item = pystac.Item(
        id=storage.name(storage.absolute(out)),
        geometry=geometry,
        bbox=list(shapely.geometry.shape(geometry).bounds),
        datetime=times[0] if len(set(times)) == 1 else None if times else made or datetime.now(UTC),
        start_datetime=times[0] if len(set(times)) > 1 else None,
        end_datetime=times[-1] if len(set(times)) > 1 else None,
        properties={},
    )
    projection = ProjectionExtension.ext(item, add_if_missing=True)
    epsg = grid.crs.to_epsg()
    if epsg:
        projection.code = f"EPSG:{epsg}"
    else:
        projection.wkt2 = grid.crs_wkt
    projection.shape = [grid.height, grid.width]
    projection.transform = list(grid.transform)
    model = manifest.get("model", {})
    item.properties.update(
        {
            "processing:software": {"geoseg": manifest.get("geoseg_version", "unknown")},
            "processing:lineage": lineage
            or (
                f"land-cover segmentation of {len(manifest.get('inputs', []))} input(s) by a {model.get('arch')} "
                f"model (bands {', '.join(model.get('bands', []))}; checkpoint sha256 {model.get('sha256')})"
            ),
            "geoseg:model": {k: model.get(k) for k in ("arch", "bands", "sha256")},
            "geoseg:run_id": manifest.get("run_id"),
            "geoseg:status": manifest.get("status"),
        }
    )
    item.stac_extensions.append(PROCESSING_SCHEMA)
    ClassificationExtension.add_to(item)
    for name in names:
        item.add_asset(name, asset_for(name, legend, colors))
    return item


def write_item(out: str, item: pystac.Item) -> str:
    """``OUT/item.json``; hrefs stay relative to it, wherever OUT is (folder or URL)."""
    loc = storage.join(out, ITEM_NAME)
    storage.write_text(loc, json.dumps(item.to_dict(include_self_link=False, transform_hrefs=False), indent=2))
    return loc


def remove_asset_files(out: str, keep: tuple[str, ...] = ()) -> list[str]:
    """Remove the files in ``out`` that its run's Item names (an export's COG, styles and
    report among them), but those in ``keep``: a run that replaces the run there must not leave
    them describing the old mosaic. The names removed."""
    data = storage.read_if_exists(storage.join(out, ITEM_NAME))
    if data is None:
        return []
    hrefs = [str(asset.get("href", "")) for asset in json.loads(data).get("assets", {}).values()]
    names = [href.removeprefix("./") for href in hrefs]
    # files of its own folder only: no URL, no subfolder, nothing the run replaces itself
    removed = [name for name in names if name and "/" not in name and ":" not in name and name not in keep]
    for name in removed:
        storage.delete(storage.join(out, name))
    return removed


def add_assets(
    out: str,
    manifest: dict[str, Any],
    legend: dict[int, str],
    colors: dict[int, str],
    names: list[str],
    dropped: list[str] | None = None,
) -> str:
    """The run's Item with the output files ``names`` added (``geoseg export``) and those
    ``dropped`` taken out; made anew if it has none."""
    loc = storage.join(out, ITEM_NAME)
    old = json.loads(storage.read_text(loc)) if storage.exists(loc) else {}
    known = [name for name in old.get("assets", {}) if name not in (dropped or [])]
    made = old.get("properties", {}).get("datetime")  # the item keeps its date
    item = run_item(
        out,
        manifest,
        legend,
        colors,
        [*known, *(n for n in names if n not in known)],
        made=str_to_datetime(made) if made else None,
    )
    return write_item(out, item)
