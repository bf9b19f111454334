"""Class mosaic -> polygons: polygonize each block, then merge what block edges cut.

A polygon that does not reach an interior block edge is final as it comes out of its block.
The others are unioned per class across blocks and split back into connected parts, which
gives the polygons that polygonizing the whole mosaic at once would give (same
4-connectivity: parts that meet at a corner only stay separate).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import geopandas as gpd
import numpy as np
import shapely
from rasterio.crs import CRS
from rasterio.features import shapes
from rasterio.transform import Affine
from shapely.geometry import shape

from geoseg.blending import NODATA
from geoseg.tiling import Block

EQUAL_AREA_CRS = "EPSG:6933"  # for areas of mosaics in geographic coordinates


@dataclass
class BlockPolygons:
    """Polygons of one block: ``final`` ones are done, ``edge`` ones wait for the merge."""

    final: list[tuple[int, shapely.Polygon]] = field(default_factory=list)
    edge: list[tuple[int, shapely.Polygon]] = field(default_factory=list)


def polygonize_block(classes: np.ndarray, block: Block, transform: Affine, height: int, width: int) -> BlockPolygons:
    """Polygons of a block's class array, split by whether they touch an interior block edge."""
    block_transform = transform @ Affine.translation(block.cols.start, block.rows.start)
    west, north = transform @ (block.cols.start, block.rows.start)
    east, south = transform @ (block.cols.stop, block.rows.stop)
    tol = 0.25 * min(abs(transform.a), abs(transform.e))
    # Which sides of this block are shared with another block (the mosaic's outer edge is not).
    interior = {
        "west": block.cols.start > 0,
        "east": block.cols.stop < width,
        "north": block.rows.start > 0,
        "south": block.rows.stop < height,
    }
    out = BlockPolygons()
    mask = classes != NODATA
    if not mask.any():
        return out
    for geom, value in shapes(classes, mask=mask, connectivity=4, transform=block_transform):
        poly = shape(geom)
        minx, miny, maxx, maxy = poly.bounds  # north-up grid: west < east, south < north
        touches = (
            (interior["west"] and abs(minx - west) < tol)
            or (interior["east"] and abs(maxx - east) < tol)
            or (interior["north"] and abs(maxy - north) < tol)
            or (interior["south"] and abs(miny - south) < tol)
        )
        (out.edge if touches else out.final).append((int(value), poly))
    return out


def merge_edge_polygons(pieces: Iterable[tuple[int, shapely.Polygon]]) -> list[tuple[int, shapely.Polygon]]:
    """Union same-class pieces that share an edge across block boundaries."""
    by_class: dict[int, list[shapely.Polygon]] = defaultdict(list)
    for value, poly in pieces:
        by_class[value].append(poly)
    merged: list[tuple[int, shapely.Polygon]] = []
    for value in sorted(by_class):
        union = shapely.union_all(by_class[value])
        # union_all leaves the former block boundary's vertices in straight edges: drop them.
        union = shapely.simplify(union, 0)
        merged.extend((value, part) for part in shapely.get_parts(union) if not part.is_empty)
    return merged


def areas_m2(geoms: gpd.GeoSeries) -> np.ndarray:
    """Areas in square metres whatever the CRS's units."""
    crs = CRS.from_user_input(geoms.crs)
    if crs.is_geographic:
        return geoms.to_crs(EQUAL_AREA_CRS).area.to_numpy()
    factor = crs.linear_units_factor[1] if crs.linear_units_factor else 1.0
    return geoms.area.to_numpy() * factor**2


def to_geodataframe(polygons: list[tuple[int, shapely.Polygon]], crs: str, legend: dict[int, str]) -> gpd.GeoDataFrame:
    values = np.array([v for v, _ in polygons], dtype=np.uint8)
    gdf = gpd.GeoDataFrame(
        {"class_id": values, "class_name": [legend.get(int(v), str(v)) for v in values]},
        geometry=[p for _, p in polygons],
        crs=crs,
    )
    gdf["area_m2"] = areas_m2(gdf.geometry) if len(gdf) else np.array([], dtype=float)
    # A stable order so reruns write identical files.
    order = (
        np.lexsort(
            (
                gdf.geometry.bounds["minx"].to_numpy(),
                gdf.geometry.bounds["maxy"].to_numpy() * -1,
                gdf["class_id"].to_numpy(),
            )
        )
        if len(gdf)
        else []
    )
    return gdf.iloc[order].reset_index(drop=True)[["class_id", "class_name", "area_m2", "geometry"]]
