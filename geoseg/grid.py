"""The one output grid of a run: CRS, pixel size and extent, and where each scene lands on it."""

from __future__ import annotations

import math
from dataclasses import dataclass

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
