"""The Zarr mosaic: created once with its georeference, then written one block region at a time.

The layout is the one xarray and rioxarray understand: (y, x) arrays, pixel-centre
coordinates, and a scalar ``spatial_ref`` variable carrying the CRS as WKT and the GDAL
geotransform, referenced by each array's ``grid_mapping``. Zarr v3 by default (dimension
names in the metadata, zstd); Zarr v2 on request, which GDAL's Zarr driver opens from 3.4 on
(the ``_ARRAY_DIMENSIONS`` attribute xarray uses, GDAL's ``_CRS`` attribute, and zstd, which
the GDAL of rasterio's wheels and Debian's both carry). GDAL 3.10 refuses Zarr v3 arrays
("Unsupported codec: bytes").
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from rasterio.transform import Affine

from geoseg import overviews, storage
from geoseg.blending import NODATA
from geoseg.grid import OutputGrid
from geoseg.tiling import Block, level_chunks

MOSAIC_NAME = "mosaic.zarr"  # in a run's OUT
CHANGE_STORE = "change.zarr"  # in a change's OUT
CLASSES = "classes"
CONFIDENCE = "confidence"


@dataclass(frozen=True)
class Layer:
    """One (y, x) array of a georeferenced store."""

    name: str
    dtype: str
    fill_value: int
    attrs: dict[str, Any] = field(default_factory=dict)


ZARR_V2_COMPRESSOR = {"id": "zstd", "level": 0}  # v3's default codec, in v2's terms
OVERVIEWS = "overviews"  # OVERVIEWS/<factor>/{classes,confidence}

# The GeoZarr conventions (zarr-conventions, being standardised), registered as they ask.
CONVENTIONS = {
    "spatial": {
        "schema_url": "https://raw.githubusercontent.com/zarr-conventions/spatial/refs/tags/v1/schema.json",
        "spec_url": "https://github.com/zarr-conventions/spatial/blob/v1/README.md",
        "uuid": "689b58e2-cf7b-45e0-9fff-9cfc0883d6b4",
        "name": "spatial",
        "description": "Spatial coordinate information",
    },
    "proj": {
        "schema_url": "https://raw.githubusercontent.com/zarr-conventions/geo-proj/refs/tags/v1/schema.json",
        "spec_url": "https://github.com/zarr-conventions/geo-proj/blob/v1/README.md",
        "uuid": "f17cb550-5864-4468-aeb7-f3180cfb622f",
        "name": "proj",
        "description": "Coordinate reference system information for geospatial data",
    },
    "multiscales": {
        "schema_url": "https://raw.githubusercontent.com/zarr-conventions/multiscales/refs/tags/v0.1/schema.json",
        "spec_url": "https://github.com/zarr-conventions/multiscales/blob/v0.1/README.md",
        "uuid": "d35379db-88df-4056-af3a-620245f8e347",
        "name": "multiscales",
        "description": "Multiscale layout of zarr datasets",
    },
}


def geozarr_attrs(grid: OutputGrid, factor: int = 1) -> dict[str, Any]:
    """The ``spatial:`` and ``proj:`` attributes of the grid, or of its overview level ``factor``."""
    level = level_of(grid, factor)
    t, height, width = level.affine, level.height, level.width
    epsg = grid.crs.to_epsg()
    return {
        "spatial:dimensions": ["y", "x"],
        "spatial:transform_type": "affine",
        "spatial:transform": [t.a, t.b, t.c, t.d, t.e, t.f],
        "spatial:shape": [height, width],
        "spatial:bbox": list(grid.bounds),
        "spatial:registration": "pixel",
        **({"proj:code": f"EPSG:{epsg}"} if epsg else {}),
        "proj:wkt2": grid.crs_wkt,
    }


def create_store(
    path: Path,
    grid: OutputGrid,
    block_size: int,
    layers: list[Layer],
    attrs: dict[str, Any] | None = None,
    zarr_format: int = 3,
    levels: list[int] | None = None,
) -> None:
    """Create (or replace) a Zarr group of (y, x) arrays chunked by block, georeferenced for
    rioxarray (and, in Zarr v2, for GDAL), with the GeoZarr ``spatial:``/``proj:`` attributes;
    ``levels`` are the factors of overview levels (``OVERVIEWS/<factor>``, see :mod:`geoseg.overviews`)."""
    epsg = grid.crs.to_epsg()
    geoseg_attrs = {
        "crs_wkt": grid.crs_wkt,
        "epsg": epsg,
        "transform": list(grid.transform),
        "width": grid.width,
        "height": grid.height,
        **(attrs or {}),
    }
    # Attributes go in at creation: each later update rewrites the array's zarr.json.
    # The hierarchy is built in memory and written in one go: zarr building it on an object
    # store checks and rewrites the parents of every node, ~200 requests one after another.
    documents: dict[str, Any] = {}
    store = zarr.storage.MemoryStore(documents)
    levels = levels or []
    geoseg_attrs["overviews"] = levels
    root_attrs: dict[str, Any] = {
        "geoseg": geoseg_attrs,
        "zarr_conventions": [CONVENTIONS[name] for name in ("spatial", "proj", *(["multiscales"] if levels else []))],
        **geozarr_attrs(grid),
    }
    if levels:
        # level 0 stays at the root (where xarray finds it); the layout names each level's classes
        root_attrs["multiscales"] = {
            "layout": [
                {"asset": CLASSES, "transform": {"scale": [1.0, 1.0]}},
                *(
                    {
                        "asset": f"{OVERVIEWS}/{f}/{CLASSES}",
                        "derived_from": CLASSES,
                        "transform": {"scale": [float(f), float(f)]},
                        "resampling_method": "mode",
                        "spatial:transform": geozarr_attrs(grid, f)["spatial:transform"],
                        "spatial:shape": geozarr_attrs(grid, f)["spatial:shape"],
                    }
                    for f in levels
                ),
            ],
            "resampling_method": "mode",
            "geoseg:confidence": "beside the classes of each level, the mean over the valid pixels",
        }
    group = zarr.open_group(store, mode="w", zarr_format=zarr_format, attributes=root_attrs)
    chunks = (min(block_size, grid.height), min(block_size, grid.width))

    for layer_group, level_grid, chunk_shape in [
        (group, grid, chunks),
        *(
            (
                group.create_group(
                    f"{OVERVIEWS}/{f}",
                    attributes={"zarr_conventions": root_attrs["zarr_conventions"][:2], **geozarr_attrs(grid, f)},
                ),
                level_of(grid, f),
                # a block's size at every level: one chunk holds f x f blocks' windows, written
                # whole once they are final (see write_overview_chunk)
                (min(block_size, level_of(grid, f).height), min(block_size, level_of(grid, f).width)),
            )
            for f in levels
        ),
    ]:
        georeferenced_arrays(layer_group, level_grid, chunk_shape, layers, zarr_format)
    with warnings.catch_warnings():  # consolidated metadata is not in the v3 spec yet; xarray reads it
        warnings.simplefilter("ignore")
        for f in levels:  # each level opens on its own too (xr.open_zarr(".../overviews/2"))
            zarr.consolidate_metadata(store, path=f"{OVERVIEWS}/{f}")
        zarr.consolidate_metadata(store)
    storage.writable_output(str(path))
    storage.clear_tree(str(path))  # a replaced store leaves no chunk behind
    for nested in (True, False):  # the root's documents last: they make the store exist
        storage.write_many(
            {storage.join(str(path), key): data.to_bytes() for key, data in documents.items() if ("/" in key) == nested}
        )


def level_of(grid: OutputGrid, factor: int) -> OutputGrid:
    """The grid of overview level ``factor``: pixels ``factor`` times larger, whole windows."""
    t = grid.affine * Affine.scale(factor)
    return OutputGrid(grid.crs_wkt, (t.a, t.b, t.c, t.d, t.e, t.f), -(-grid.width // factor), -(-grid.height // factor))


def georeferenced_arrays(
    group: zarr.Group, grid: OutputGrid, chunks: tuple[int, int], layers: list[Layer], zarr_format: int
) -> None:
    """``layers`` as (y, x) arrays of ``group`` on ``grid``, with the pixel-centre coordinates and
    the ``spatial_ref`` variable rioxarray reads, and (Zarr v2) the ``_CRS`` GDAL reads."""

    def dims(*names: str) -> dict[str, Any]:
        """How each format names an array's dimensions (v2: xarray's attribute)."""
        if zarr_format == 2:
            return {"compressors": ZARR_V2_COMPRESSOR, "attributes": {"_ARRAY_DIMENSIONS": list(names)}}
        return {"dimension_names": names, "attributes": {}}

    t = grid.affine
    crs_for_gdal = {"_CRS": {"wkt": grid.crs_wkt}} if zarr_format == 2 else {}
    for layer in layers:
        spec = dims("y", "x")
        group.create_array(
            layer.name,
            shape=(grid.height, grid.width),
            chunks=chunks,
            dtype=layer.dtype,
            fill_value=layer.fill_value,
            compressors=spec.get("compressors", "auto"),
            dimension_names=spec.get("dimension_names"),
            attributes={
                **spec["attributes"],
                "grid_mapping": "spatial_ref",
                "coordinates": "spatial_ref",
                "spatial:dimensions": ["y", "x"],
                **crs_for_gdal,
                **layer.attrs,
            },
        )
    axes = {
        "x": (t.c + t.a * (np.arange(grid.width) + 0.5), "projection_x_coordinate"),
        "y": (t.f + t.e * (np.arange(grid.height) + 0.5), "projection_y_coordinate"),
    }
    for name, (centres, standard_name) in axes.items():
        spec = dims(name)
        group.create_array(
            name,
            data=centres,
            dimension_names=spec.get("dimension_names"),
            attributes={**spec["attributes"], "standard_name": standard_name, "axis": name.upper()},
        )
    spatial_ref = {
        "crs_wkt": grid.crs_wkt,
        "spatial_ref": grid.crs_wkt,
        "GeoTransform": " ".join(str(v) for v in (t.c, t.a, t.b, t.f, t.d, t.e)),
        "epsg": grid.crs.to_epsg(),
    }
    spec = dims()
    group.create_array(
        "spatial_ref",
        data=np.array(0, dtype="int64"),
        dimension_names=spec.get("dimension_names"),
        attributes={**spec["attributes"], **spatial_ref},
    )


def exists(path: str | Path) -> bool:
    """Whether a Zarr store (v3 or v2) is at ``path``."""
    return any(storage.exists(storage.join(str(path), name)) for name in ("zarr.json", ".zgroup"))


def class_attrs(legend: dict[int, str], long_name: str) -> dict[str, Any]:
    """CF-style attributes of a class array: nodata and the value -> name table."""
    return {
        "long_name": long_name,
        "nodata": NODATA,
        "flag_values": sorted(legend),
        "flag_meanings": " ".join(legend[k].replace(" ", "_") for k in sorted(legend)),
    }


def create_mosaic(
    path: Path,
    grid: OutputGrid,
    block_size: int,
    legend: dict[int, str],
    colors: dict[int, str] | None = None,
    attrs: dict[str, Any] | None = None,
    zarr_format: int = 3,
) -> None:
    """Create (or replace) the class mosaic; pixels are written by ``write_block``."""
    layers = [
        Layer(CLASSES, "uint8", NODATA, class_attrs(legend, "land-cover class")),
        Layer(CONFIDENCE, "uint8", 0, {"long_name": "confidence of the class", "units": "percent"}),
    ]
    meta = {
        "classes": {str(k): v for k, v in legend.items()},
        "colors": {str(k): v for k, v in (colors or {}).items()},
        **(attrs or {}),
    }
    levels = overviews.overview_factors(grid.height, grid.width, block_size)
    create_store(path, grid, block_size, layers, meta, zarr_format, levels)


def write_region(path: Path, block: Block, arrays: dict[str, np.ndarray]) -> None:
    """Write one block's region of each named array; blocks are chunk-aligned, so writers never share a chunk."""
    write_arrays(open_group(path, "r+"), [(name, block.region, data) for name, data in arrays.items()])


@lru_cache(maxsize=16)
def _group_of_run(path: str, mode: str, run_id: str) -> zarr.Group:
    return open_group(path, mode)


def run_group(path: Path | str, mode: str = "r", run_id: str | None = None) -> zarr.Group:
    """:func:`open_group`, once per process for the run ``run_id``: the store's metadata does not
    change while a run writes its blocks (on an object store, one GET per worker, not per task)."""
    return open_group(path, mode) if run_id is None else _group_of_run(str(path), mode, run_id)


def open_group(path: Path | str, mode: str = "r") -> zarr.Group:
    """The store's root group, its members' metadata read at once from the consolidated
    metadata (on an object store, one GET instead of one per array). Zarr v3 is asked for
    first: left to guess, zarr also asks for the three v2 documents every time."""
    store = storage.zarr_store(str(path), read_only=mode == "r")
    try:
        return zarr.open_group(store, mode=mode, zarr_format=3)
    except zarr.errors.GroupNotFoundError:
        return zarr.open_group(store, mode=mode, zarr_format=2)


def write_arrays(group: zarr.Group, writes: list[tuple[str, tuple[slice, slice], np.ndarray]]) -> None:
    """Each ``(name, region, data)``: ``data`` into ``region`` of the array ``name`` (a path in
    ``group``), the arrays written concurrently (on an object store, their chunks in flight together).

    Every chunk is stored, even one of fill values only (a block all nodata): zarr's check for
    that (``write_empty_chunks``) compares the whole chunk against its fill value, which took
    twice as long as compressing it (benchmarks/README.md).
    """
    with zarr.config.set({"array.write_empty_chunks": True}):  # read when an array is opened
        stored = {name: group[name] for name, _, _ in writes}

    def write(item: tuple[str, tuple[slice, slice], np.ndarray]) -> None:
        name, region, data = item
        stored[name][region] = data

    storage.concurrently(write, writes, remote=not isinstance(group.store, zarr.storage.LocalStore))


def write_block(
    path: Path, block: Block, classes: np.ndarray, confidence: np.ndarray, run_id: str | None = None
) -> None:
    """A block of the class mosaic (its overview levels are :func:`write_overview_chunk`'s);
    ``run_id``: see :func:`run_group`."""
    write_arrays(
        run_group(path, "r+", run_id), [(CLASSES, block.region, classes), (CONFIDENCE, block.region, confidence)]
    )


def overview_factors_of(path: Path | str, run_id: str | None = None) -> list[int]:
    """The factors of the store's overview levels."""
    return list(run_group(path, "r", run_id).attrs["geoseg"].get("overviews", []))


def write_overview_chunk(
    path: Path | str,
    factor: int,
    origin: tuple[int, int],
    span: int,
    pieces: list[tuple[int, int, np.ndarray, np.ndarray] | None],
    run_id: str | None = None,
) -> None:
    """The ``span`` x ``span`` region of overview level ``factor`` at ``origin`` (its first row
    and column on the level: one chunk, or the whole chunks of an older store's smaller ones),
    written whole from its blocks' windows ``(row, col, classes, confidence)`` on the level
    (None: a block with no data there); the rest keeps the fill values."""
    group = run_group(path, "r+", run_id)
    level = f"{OVERVIEWS}/{factor}"
    stored = group[f"{level}/{CLASSES}"]
    rows = slice(origin[0], min(origin[0] + span, stored.shape[0]))
    cols = slice(origin[1], min(origin[1] + span, stored.shape[1]))
    shape = (rows.stop - rows.start, cols.stop - cols.start)
    classes = np.full(shape, stored.fill_value, dtype=stored.dtype)
    confidence = np.full(shape, group[f"{level}/{CONFIDENCE}"].fill_value, dtype=np.uint8)
    for piece in pieces:
        if piece is not None:
            r, c, piece_classes, piece_confidence = piece
            window = (
                slice(r - rows.start, r - rows.start + piece_classes.shape[0]),
                slice(c - cols.start, c - cols.start + piece_classes.shape[1]),
            )
            classes[window], confidence[window] = piece_classes, piece_confidence
    write_arrays(
        group, [(f"{level}/{CLASSES}", (rows, cols), classes), (f"{level}/{CONFIDENCE}", (rows, cols), confidence)]
    )


def write_overviews(path: Path | str, blocks: list[Block]) -> None:
    """Every overview chunk of a mosaic whose ``blocks`` are written (by other means than a run,
    which writes its chunks as blocks finish): each block's windows, placed in their chunks.
    ``blocks`` must be all of them (a chunk is written whole), and their windows are held in
    memory (a third of the mosaic): for tests, benchmarks and small mosaics."""
    factors = overview_factors_of(path)
    windows = {}
    for b in blocks:
        classes, confidence = read_regions(path, [(CLASSES, *b.region), (CONFIDENCE, *b.region)])
        windows[b.key] = overviews.levels(classes, confidence, factors)
    size = max(max(b.rows.stop - b.rows.start, b.cols.stop - b.cols.start) for b in blocks)  # a block's: a chunk's
    for f in factors:
        for (i, j), members in level_chunks(blocks, f).items():
            pieces = [(b.rows.start // f, b.cols.start // f, *windows[b.key][f]) for b in members]
            write_overview_chunk(path, f, (i * size, j * size), size, pieces)


def open_array(path: str | Path, name: str = CLASSES) -> zarr.Array:
    """One array of a store, read-only (v3 asked for first, as in :func:`open_group`)."""
    store = storage.zarr_store(str(path), read_only=True)
    try:
        return zarr.open_array(store, path=name, mode="r", zarr_format=3)
    except zarr.errors.ArrayNotFoundError:
        return zarr.open_array(store, path=name, mode="r", zarr_format=2)


def read_region(path: str | Path, rows: slice, cols: slice, name: str = CLASSES) -> np.ndarray:
    return open_array(path, name)[rows, cols]


def read_regions(
    path: str | Path, regions: list[tuple[str, slice, slice]], run_id: str | None = None
) -> list[np.ndarray]:
    """Each ``(name, rows, cols)`` region of the store's arrays, their metadata read at once
    from the consolidated metadata (on an object store, one GET instead of one per array);
    ``run_id``: see :func:`run_group`."""
    group = run_group(path, "r", run_id)
    return [group[name][rows, cols] for name, rows, cols in regions]


def as_group(store: str | Path | zarr.Group) -> zarr.Group:
    """A store's root group, opened (for reading) unless it is open already: a caller that reads
    several things opens it once (on an object store, each open is a round trip)."""
    return store if isinstance(store, zarr.Group) else open_group(store)


def read_attrs(store: str | Path | zarr.Group) -> dict[str, Any]:
    """geoseg's attributes of a store (georeference, legend, fingerprint)."""
    return as_group(store).attrs["geoseg"]


def read_grid(path: Path) -> OutputGrid:
    """The georeference stored with a mosaic."""
    meta = read_attrs(path)
    return OutputGrid(meta["crs_wkt"], tuple(meta["transform"]), meta["width"], meta["height"])


def read_legend(store: str | Path | zarr.Group) -> dict[int, str]:
    meta = read_attrs(store)
    return {int(k): v for k, v in meta["classes"].items()}


def read_colors(store: str | Path | zarr.Group) -> dict[int, str]:
    meta = read_attrs(store)
    return {int(k): v for k, v in meta.get("colors", {}).items()}
