"""The Zarr v3 mosaic: created once with its georeference, then written one block region at a time.

The layout is the one xarray and rioxarray understand: arrays with ``dimension_names``
(y, x), pixel-centre coordinates, and a scalar ``spatial_ref`` variable carrying the CRS
as WKT and the GDAL geotransform, referenced by each array's ``grid_mapping``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from geoseg.blending import NODATA
from geoseg.grid import OutputGrid
from geoseg.tiling import Block

CLASSES = "classes"
CONFIDENCE = "confidence"


def create_mosaic(
    path: Path,
    grid: OutputGrid,
    block_size: int,
    legend: dict[int, str],
    colors: dict[int, str] | None = None,
    attrs: dict[str, Any] | None = None,
) -> None:
    """Create (or replace) the mosaic's arrays and metadata; pixels are written by ``write_block``."""
    t = grid.affine
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    chunks = (min(block_size, grid.height), min(block_size, grid.width))
    shape = (grid.height, grid.width)
    common = {"grid_mapping": "spatial_ref", "coordinates": "spatial_ref"}
    classes = group.create_array(
        CLASSES, shape=shape, chunks=chunks, dtype="uint8", fill_value=NODATA, dimension_names=("y", "x")
    )
    classes.attrs.update(
        {
            **common,
            "long_name": "land-cover class",
            "nodata": NODATA,
            "flag_values": sorted(legend),
            "flag_meanings": " ".join(legend[k].replace(" ", "_") for k in sorted(legend)),
        }
    )
    confidence = group.create_array(
        CONFIDENCE, shape=shape, chunks=chunks, dtype="uint8", fill_value=0, dimension_names=("y", "x")
    )
    confidence.attrs.update({**common, "long_name": "confidence of the class", "units": "percent"})
    x = group.create_array("x", shape=(grid.width,), dtype="float64", dimension_names=("x",))
    x[:] = t.c + t.a * (np.arange(grid.width) + 0.5)
    x.attrs.update({"standard_name": "projection_x_coordinate", "axis": "X"})
    y = group.create_array("y", shape=(grid.height,), dtype="float64", dimension_names=("y",))
    y[:] = t.f + t.e * (np.arange(grid.height) + 0.5)
    y.attrs.update({"standard_name": "projection_y_coordinate", "axis": "Y"})
    ref = group.create_array("spatial_ref", shape=(), dtype="int64", dimension_names=())
    ref[...] = 0
    crs = grid.crs
    ref.attrs.update(
        {
            "crs_wkt": grid.crs_wkt,
            "spatial_ref": grid.crs_wkt,
            "GeoTransform": " ".join(str(v) for v in (t.c, t.a, t.b, t.f, t.d, t.e)),
            "epsg": crs.to_epsg(),
        }
    )
    group.attrs.update(
        {
            "geoseg": {
                "crs_wkt": grid.crs_wkt,
                "epsg": crs.to_epsg(),
                "transform": list(grid.transform),
                "width": grid.width,
                "height": grid.height,
                "classes": {str(k): v for k, v in legend.items()},
                "colors": {str(k): v for k, v in (colors or {}).items()},
                **(attrs or {}),
            }
        }
    )
    with warnings.catch_warnings():  # consolidated metadata is not in the v3 spec yet; xarray reads it
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(path))


def write_block(path: Path, block: Block, classes: np.ndarray, confidence: np.ndarray) -> None:
    """Write one block's region; blocks are chunk-aligned, so concurrent writers never share a chunk."""
    region = (slice(block.rows.start, block.rows.stop), slice(block.cols.start, block.cols.stop))
    zarr.open_array(str(Path(path) / CLASSES), mode="r+")[region] = classes
    zarr.open_array(str(Path(path) / CONFIDENCE), mode="r+")[region] = confidence


def read_region(path: Path, rows: slice, cols: slice, name: str = CLASSES) -> np.ndarray:
    return zarr.open_array(str(Path(path) / name), mode="r")[rows, cols]


def read_grid(path: Path) -> OutputGrid:
    """The georeference stored with a mosaic."""
    meta = zarr.open_group(str(path), mode="r").attrs["geoseg"]
    return OutputGrid(meta["crs_wkt"], tuple(meta["transform"]), meta["width"], meta["height"])


def read_legend(path: Path) -> dict[int, str]:
    meta = zarr.open_group(str(path), mode="r").attrs["geoseg"]
    return {int(k): v for k, v in meta["classes"].items()}


def read_colors(path: Path) -> dict[int, str]:
    meta = zarr.open_group(str(path), mode="r").attrs["geoseg"]
    return {int(k): v for k, v in meta.get("colors", {}).items()}
