"""Web map tiles of a finished run: XYZ PNG tiles in Web Mercator, TileJSON, the legend.

rio-tiler reads a tile from an xarray view of one level of the mosaic (morecantile's
WebMercatorQuad gives the tile's bounds); xarray reads lazily, so a tile reads only the
chunks it covers. The level is the coarsest overview (``overviews/<factor>``, see
:mod:`geoseg.overviews`) that still has at least the tile's resolution, else full resolution.
Classes are resampled by nearest neighbour and drawn in their exact colours, nodata
transparent; the confidence is drawn on a colour ramp.
"""

from __future__ import annotations

import io
import json
import threading
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import morecantile
import numpy as np
import xarray as xr
from PIL import Image
from rasterio.warp import transform_bounds
from rio_tiler.errors import TileOutsideBounds
from rio_tiler.io import XarrayReader

from geoseg import mosaic, storage
from geoseg.blending import NODATA
from geoseg.grid import OutputGrid
from geoseg.mosaic import CHANGE_STORE, MOSAIC_NAME
from geoseg.quicklook import colorize

TILE_SIZE = 256
WEB_MERCATOR = morecantile.tms.get("WebMercatorQuad")


@dataclass(frozen=True)
class Layer:
    """A raster layer of a run: an array of a Zarr store, and how it is drawn."""

    name: str
    store: str
    array: str
    kind: str  # "classes" (a colour per value) or "ramp" (0..100 on a colour ramp)
    colors: dict[int, str] = field(default_factory=dict)
    title: str = ""
    mask_array: str | None = None  # for a ramp: the class array whose nodata it shares


def confidence_ramp() -> np.ndarray:
    """256 x 4 RGBA: 0..100 % from dark purple to yellow (matplotlib's viridis), 101.. unused."""
    from matplotlib import colormaps

    lut = (colormaps["viridis"](np.clip(np.arange(256) / 100, 0, 1)) * 255).astype(np.uint8)
    return lut


class RunTiles:
    """The layers of a finished run (``geoseg run`` or ``geoseg change``) and their tiles."""

    def __init__(self, out: str) -> None:
        self.out = storage.absolute(out)
        self._lock = threading.Lock()
        self._arrays: dict[tuple[str, str, int], xr.DataArray] = {}
        change = storage.join(self.out, CHANGE_STORE)
        if mosaic.exists(change):
            self.kind, self.store = "change", change
            attrs = mosaic.read_attrs(change)
            self.legend = {int(k): v for k, v in attrs["classes"].items()}
            self.colors = _colors_of(attrs.get("run_a"), self.legend)
        else:
            self.kind, self.store = "run", storage.join(self.out, MOSAIC_NAME)
            self.legend = mosaic.read_legend(self.store)
            self.colors = mosaic.read_colors(self.store) or {k: "#808080" for k in self.legend}
        self.grid: OutputGrid = mosaic.read_grid(self.store)
        self.levels: list[int] = mosaic.read_attrs(self.store).get("overviews", [])

    def present(self) -> bool:
        """Whether the run's store is still there (a run removed while served is not drawn blank)."""
        return mosaic.exists(self.store)

    @cached_property
    def layers(self) -> dict[str, Layer]:
        if self.kind == "change":
            n = len(self.legend)
            changed = {f * n + t: self.colors[t] for f in self.legend for t in self.legend if f != t}
            return {
                "transition": Layer("transition", self.store, "transition", "classes", changed, "changed: to class"),
                "from_class": Layer("from_class", self.store, "from_class", "classes", self.colors, "date A"),
                "to_class": Layer("to_class", self.store, "to_class", "classes", self.colors, "date B"),
            }
        return {
            "classes": Layer("classes", self.store, mosaic.CLASSES, "classes", self.colors, "classes"),
            "confidence": Layer("confidence", self.store, mosaic.CONFIDENCE, "ramp", {}, "confidence", mosaic.CLASSES),
        }

    @cached_property
    def bounds_lonlat(self) -> tuple[float, float, float, float]:
        return transform_bounds(self.grid.crs, "EPSG:4326", *self.grid.bounds, densify_pts=21)

    def tilejson(self, name: str, base_url: str) -> dict[str, Any]:
        """TileJSON 3.0 of a layer; ``base_url`` is where this server is reached."""
        west, south, east, north = self.bounds_lonlat
        max_zoom = WEB_MERCATOR.zoom_for_res(min(abs(self.grid.affine.a), abs(self.grid.affine.e)) / 2)
        return {
            "tilejson": "3.0.0",
            "name": f"{storage.name(self.out)} {name}",
            "scheme": "xyz",
            "tiles": [f"{base_url}/{name}/tiles/{{z}}/{{x}}/{{y}}.png"],
            "minzoom": 0,
            "maxzoom": int(max_zoom),
            "bounds": [west, south, east, north],
            "center": [(west + east) / 2, (south + north) / 2, int(max(0, max_zoom - 4))],
            "vector_layers": [],
        }

    def level_for(self, tile: morecantile.Tile) -> int:
        """The coarsest level whose pixels are no larger than the tile's (1: full resolution)."""
        west, south, east, north = transform_bounds(WEB_MERCATOR.crs, self.grid.crs, *WEB_MERCATOR.xy_bounds(tile))
        pixels_across = (east - west) / abs(self.grid.affine.a)
        usable = [f for f in self.levels if pixels_across / f >= TILE_SIZE]
        return max(usable, default=1)

    def array(self, layer: Layer, factor: int) -> xr.DataArray:
        """One level of a layer as a lazily read, georeferenced DataArray (opened once)."""
        key = (layer.store, layer.array, factor)
        with self._lock:
            if key not in self._arrays:
                group = None if factor == 1 else f"{mosaic.OVERVIEWS}/{factor}"
                ds = xr.open_zarr(
                    storage.zarr_store(layer.store, read_only=True), group=group, chunks=None, consolidated=False
                )
                da = ds[layer.array]
                transform = self.grid.affine * self.grid.affine.scale(factor)
                height, width = da.shape
                da = da.assign_coords(
                    x=transform.c + transform.a * (np.arange(width) + 0.5),
                    y=transform.f + transform.e * (np.arange(height) + 0.5),
                )
                da = da.rio.write_crs(self.grid.crs)
                self._arrays[key] = da
            return self._arrays[key]

    def tile_png(self, name: str, z: int, x: int, y: int) -> bytes:
        """The PNG of a tile, transparent where there is no data (all of it outside the run)."""
        layer = self.layers[name]
        factor = self.level_for(morecantile.Tile(x, y, z))
        try:
            data = self._read_tile(self.array(layer, factor), x, y, z)
            classes = data if layer.mask_array is None else self._read_tile(self._mask(layer, factor), x, y, z)
        except TileOutsideBounds:
            return EMPTY_TILE
        if layer.kind == "classes":
            rgba = colorize(data, layer.colors)
        else:
            rgba = confidence_ramp()[data]
            rgba[classes == NODATA, 3] = 0  # no class, no confidence
        return png(rgba)

    def _mask(self, layer: Layer, factor: int) -> xr.DataArray:
        assert layer.mask_array is not None
        return self.array(Layer(layer.mask_array, layer.store, layer.mask_array, "classes"), factor)

    @staticmethod
    def _read_tile(values: xr.DataArray, x: int, y: int, z: int) -> np.ndarray:
        """A tile of ``values`` by nearest neighbour, NODATA outside the array."""
        with XarrayReader(values, tms=WEB_MERCATOR) as reader:
            img = reader.tile(x, y, z, tilesize=TILE_SIZE, reproject_method="nearest", nodata=NODATA)
        return np.asarray(img.array[0].filled(NODATA), dtype=np.uint8)

    def legend_rows(self) -> list[dict[str, Any]]:
        """Names, colours and area per class: from the run's report (``geoseg export``) when
        there is one, else from the class histograms its manifest records."""
        report_loc = storage.join(self.out, "report.json")
        areas: dict[str, float] = {}
        if self.kind == "run" and storage.exists(report_loc):
            report = json.loads(storage.read_text(report_loc))
            areas = {row["class_name"]: row["area_km2"] for row in report.get("classes", [])}
        elif self.kind == "run" and storage.exists(storage.join(self.out, "manifest.json")):
            manifest = json.loads(storage.read_text(storage.join(self.out, "manifest.json")))
            pixels = np.zeros(256, dtype=np.int64)
            for record in manifest.get("blocks", {}).values():
                for value, count in (record.get("histogram") or {}).items():
                    pixels[int(value)] += count
            km2 = self.grid.pixel_area / 1e6
            areas = {self.legend[k]: float(pixels[k] * km2) for k in self.legend}
        return [
            {
                "value": k,
                "name": self.legend[k],
                "color": self.colors.get(k, "#808080"),
                "km2": areas.get(self.legend[k]),
            }
            for k in sorted(self.legend)
        ]

    def polygons_location(self) -> str | None:
        name = "change_polygons.gpkg" if self.kind == "change" else "polygons.gpkg"
        loc = storage.join(self.out, name)
        return loc if storage.exists(loc) else None

    def polygons_geojson(self, bbox: tuple[float, float, float, float], limit: int = 5000) -> dict[str, Any]:
        """The polygons that meet ``bbox`` (lon/lat), in lon/lat, at most ``limit`` of them."""
        import pyogrio

        loc = self.polygons_location()
        if loc is None:
            return {"type": "FeatureCollection", "features": []}
        local = storage.cached_copy(loc) if storage.is_url(loc) else loc
        native = transform_bounds("EPSG:4326", self.grid.crs, *bbox)
        gdf = pyogrio.read_dataframe(local, bbox=native, max_features=limit + 1)
        collection = json.loads(gdf.iloc[:limit].to_crs("EPSG:4326").to_json(drop_id=True))
        collection["truncated"] = len(gdf) > limit  # more meet the box: zoom in
        return collection


def png(rgba: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG", compress_level=1)  # speed over size
    return buffer.getvalue()


EMPTY_TILE = png(np.zeros((TILE_SIZE, TILE_SIZE, 4), dtype=np.uint8))


def _colors_of(run: str | None, legend: dict[int, str]) -> dict[int, str]:
    """The class colours of the run a change was computed from (grey where unknown)."""
    if run:
        store = storage.join(run, MOSAIC_NAME)
        if mosaic.exists(store):
            colors = mosaic.read_colors(store)
            if colors:
                return colors
    return {k: "#808080" for k in legend}
