"""The one output grid of a run: CRS, pixel size and extent, and where each scene lands on it."""

from __future__ import annotations

import math
from dataclasses import dataclass

from rasterio.crs import CRS
from rasterio.transform import Affine
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from geoseg.scenes import RasterGrid, SceneInfo


@dataclass(frozen=True)
class OutputGrid(RasterGrid):
    """The grid every output of a run is on."""

    @property
    def pixel_area(self) -> float:
        t = self.affine
        return abs(t.a * t.e - t.b * t.d)

    def window_of(self, scene: SceneInfo) -> Window:
        """The scene's footprint on this grid, in (possibly fractional) pixels."""
        west, south, east, north = transform_bounds(scene.crs, self.crs, *scene.bounds)
        inv = ~self.affine
        c0, r0 = inv @ (west, north)
        c1, r1 = inv @ (east, south)
        return Window(min(c0, c1), min(r0, r1), abs(c1 - c0), abs(r1 - r0))


def chosen_grid(
    scenes: list[SceneInfo],
    crs: str | None = None,
    resolution: float | None = None,
    aoi: tuple[float, float, float, float] | None = None,
) -> OutputGrid:
    """The output grid with a chosen CRS, pixel size and area of interest (``aoi``: bounds in
    ``crs``); what is not chosen comes from the scenes as in :func:`grid_from_scenes`.

    Only the part of the AOI that some scene covers is kept. A grid of the scenes' own CRS and
    pixel size keeps the first scene's pixel lattice (its pixels map 1:1); any other is aligned
    on multiples of the pixel size, so that runs on one grid line up.
    """
    if not scenes:
        raise ValueError("no usable scene to define the output grid")
    native = grid_from_scenes(scenes)
    target = CRS.from_user_input(crs) if crs else native.crs
    same_crs = target == native.crs
    if resolution is None:
        if same_crs:
            resolution = abs(native.affine.a)
        else:  # the first scene's pixel size, measured across it in the target CRS
            ref = scenes[0]
            w, s, e, n = transform_bounds(ref.crs, target, *ref.bounds)
            resolution = min((e - w) / ref.width, (n - s) / ref.height)
    west, south, east, north = (
        native.bounds if same_crs else transform_bounds(native.crs, target, *native.bounds, densify_pts=21)
    )
    if aoi is not None:
        west, south, east, north = max(west, aoi[0]), max(south, aoi[1]), min(east, aoi[2]), min(north, aoi[3])
        if west >= east or south >= north:
            raise ValueError("the area of interest lies outside every scene")
    if same_crs and math.isclose(resolution, abs(native.affine.a)) and native.affine.b == 0:
        lattice = native.affine  # the first scene's pixels stay whole
    else:
        lattice = Affine(resolution, 0.0, 0.0, 0.0, -resolution, 0.0)
    res_x, res_y = lattice.a, -lattice.e
    col0 = math.floor((west - lattice.c) / res_x + 1e-9)
    col1 = math.ceil((east - lattice.c) / res_x - 1e-9)
    row0 = math.floor((lattice.f - north) / res_y + 1e-9)
    row1 = math.ceil((lattice.f - south) / res_y - 1e-9)
    transform = Affine(res_x, 0.0, lattice.c + col0 * res_x, 0.0, -res_y, lattice.f - row0 * res_y)
    return OutputGrid(target.to_wkt(), tuple(transform)[:6], col1 - col0, row1 - row0)


def aoi_bounds(aoi: list[float] | str, aoi_crs: str, crs: CRS | str) -> tuple[float, float, float, float]:
    """An area of interest's bounds in ``crs``: a bbox in ``aoi_crs``, or a vector file's geometries."""
    if isinstance(aoi, list):
        return transform_bounds(aoi_crs, crs, *aoi, densify_pts=21)
    import pyogrio

    from geoseg import storage

    with storage.local_copy(aoi) as path:
        gdf = pyogrio.read_dataframe(path)
    if gdf.crs is None:
        raise ValueError(f"{aoi}: the area of interest has no CRS")
    return tuple(gdf.to_crs(crs).total_bounds)  # type: ignore[return-value]


def grid_from_scenes(scenes: list[SceneInfo]) -> OutputGrid:
    """The first scene's CRS and pixel grid, extended to cover every scene.

    A rotated first scene gives a north-up grid with its pixel size, from its footprint's
    corner (it is then warped like any scene on another grid)."""
    if not scenes:
        raise ValueError("no usable scene to define the output grid")
    ref = scenes[0]
    west, south, east, north = ref.bounds
    if ref.rotated:
        res_x, res_y = ref.pixel_size
        t = Affine(res_x, 0.0, west, 0.0, -res_y, north)
    else:
        t = ref.affine
        res_x, res_y = t.a, -t.e
    for scene in scenes[1:]:
        w, s, e, n = transform_bounds(scene.crs, ref.crs, *scene.bounds)
        west, south, east, north = min(west, w), min(south, s), max(east, e), max(north, n)
    # Snap outward to the reference scene's pixel lattice so its pixels map 1:1.
    col0 = math.floor((west - t.c) / res_x + 1e-9)
    col1 = math.ceil((east - t.c) / res_x - 1e-9)
    row0 = math.floor((t.f - north) / res_y + 1e-9)
    row1 = math.ceil((t.f - south) / res_y - 1e-9)
    transform = Affine(res_x, 0.0, t.c + col0 * res_x, 0.0, -res_y, t.f - row0 * res_y)
    return OutputGrid(ref.crs_wkt, tuple(transform)[:6], col1 - col0, row1 - row0)
