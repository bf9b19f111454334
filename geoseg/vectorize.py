"""Class mosaic -> polygons: polygonize each block, then merge what block edges cut.

A polygon that does not reach an interior block edge is final as it comes out of its block.
The others are unioned per class across blocks and split back into connected parts, which
gives the polygons that polygonizing the whole mosaic at once would give (same
4-connectivity: parts that meet at a corner only stay separate). Each polygon carries its
pixel count and confidence sum, so attributes survive the merge exactly.
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
from scipy import ndimage
from shapely.geometry import shape

from geoseg.blending import NODATA
from geoseg.tiling import Block

EQUAL_AREA_CRS = "EPSG:6933"  # for areas of mosaics in geographic coordinates
FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)


@dataclass(frozen=True)
class Piece:
    """One polygon with what its attributes are computed from."""

    class_id: int
    geometry: shapely.Polygon
    pixels: int
    confidence_sum: float


@dataclass
class BlockPolygons:
    """Polygons of one block: ``final`` ones are done, ``edge`` ones wait for the merge."""

    final: list[Piece] = field(default_factory=list)
    edge: list[Piece] = field(default_factory=list)


def label_regions(classes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """4-connected regions of equal class: region id per pixel (0 = nodata), each region's class and size."""
    regions = np.zeros(classes.shape, dtype=np.int32)
    region_class = [NODATA]
    next_id = 1
    for value in np.unique(classes):
        if value == NODATA:
            continue
        lab, n = ndimage.label(classes == value, structure=FOUR_CONNECTED)
        regions[lab > 0] = lab[lab > 0] + (next_id - 1)
        region_class.extend([int(value)] * n)
        next_id += n
    sizes = np.bincount(regions.ravel(), minlength=next_id)
    return regions, np.asarray(region_class, dtype=np.int64), sizes


SIEVE_PASSES = 3


def sieve_halo(min_pixels: int) -> int:
    """Halo a block needs for :func:`sieve` to match the whole mosaic: each pass reaches one MMU further."""
    return SIEVE_PASSES * (min_pixels + 1) if min_pixels > 1 else 0


def sieve(classes: np.ndarray, min_pixels: int, passes: int = SIEVE_PASSES, enclosed_only: bool = False) -> np.ndarray:
    """Absorb regions smaller than ``min_pixels`` into their neighbours, for up to ``passes`` rounds.

    With ``enclosed_only``, only regions surrounded by a single class are absorbed: the holes of
    that class's polygons are filled, nothing else changes.
    """
    for _ in range(passes):
        sieved = sieve_once(classes, min_pixels, enclosed_only)
        if sieved is classes:
            break
        classes = sieved
    return classes


def sieve_once(classes: np.ndarray, min_pixels: int, enclosed_only: bool = False) -> np.ndarray:
    """Absorb regions smaller than ``min_pixels`` into the class most of their 4-neighbours have.

    Unlike GDAL's sieve (which merges into the largest neighbouring *polygon*), the rule only
    looks at a region and the ring of pixels around it, so a block read with a halo of
    ``min_pixels`` gives the same answer as the whole mosaic: a region smaller than that fits
    inside the halo, and a larger one shows at least ``min_pixels`` pixels inside it.
    Ties go to the lowest class id; nodata neighbours do not vote. Regions merged in one pass
    can still be small (two specks side by side): :func:`sieve` repeats the pass.
    """
    if min_pixels <= 1:
        return classes
    regions, region_class, sizes = label_regions(classes)
    small = (sizes < min_pixels) & (np.arange(len(sizes)) > 0)
    if not small.any():
        return classes
    n_regions = len(sizes)
    votes = np.zeros((n_regions, 256), dtype=np.int64)
    for axis in (0, 1):
        for a, b in ((slice(None, -1), slice(1, None)), (slice(1, None), slice(None, -1))):
            sl_a = (a, slice(None)) if axis == 0 else (slice(None), a)
            sl_b = (b, slice(None)) if axis == 0 else (slice(None), b)
            ra, rb = regions[sl_a], regions[sl_b]
            nb_class = classes[sl_b]
            keep = small[ra] & (ra != rb) & (nb_class != NODATA)
            np.add.at(votes, (ra[keep], nb_class[keep].astype(np.int64)), 1)
    winner = votes.argmax(axis=1)
    has_vote = votes.max(axis=1) > 0
    if enclosed_only:
        has_vote &= (votes > 0).sum(axis=1) == 1
    new_class = np.where(small & has_vote, winner, region_class).astype(np.int64)
    new_class[0] = NODATA
    return new_class[regions].astype(np.uint8)


def polygonize_block(
    classes: np.ndarray,
    block: Block,
    transform: Affine,
    height: int,
    width: int,
    confidence: np.ndarray | None = None,
) -> BlockPolygons:
    """Polygons of a block's class array, split by whether they touch an interior block edge."""
    out = BlockPolygons()
    if not (classes != NODATA).any():
        return out
    block_transform = transform @ Affine.translation(block.cols.start, block.rows.start)
    west, north = transform @ (block.cols.start, block.rows.start)
    east, south = transform @ (block.cols.stop, block.rows.stop)
    tol = 0.25 * min(abs(transform.a), abs(transform.e))
    regions, region_class, sizes = label_regions(classes)
    conf = confidence if confidence is not None else np.zeros(classes.shape, dtype=np.uint8)
    conf_sums = np.bincount(regions.ravel(), weights=conf.ravel().astype(np.float64), minlength=len(sizes))
    for geom, rid in shapes(regions, mask=regions > 0, connectivity=4, transform=block_transform):
        rid = int(rid)
        poly = shape(geom)
        minx, miny, maxx, maxy = poly.bounds  # north-up grid: west < east, south < north
        touches = (
            (block.cols.start > 0 and abs(minx - west) < tol)
            or (block.cols.stop < width and abs(maxx - east) < tol)
            or (block.rows.start > 0 and abs(maxy - north) < tol)
            or (block.rows.stop < height and abs(miny - south) < tol)
        )
        piece = Piece(int(region_class[rid]), poly, int(sizes[rid]), float(conf_sums[rid]))
        (out.edge if touches else out.final).append(piece)
    return out


def merge_edge_polygons(pieces: Iterable[Piece]) -> list[Piece]:
    """Union same-class pieces that share an edge across block boundaries; attributes add up."""
    by_class: dict[int, list[Piece]] = defaultdict(list)
    for piece in pieces:
        by_class[piece.class_id].append(piece)
    merged: list[Piece] = []
    for value in sorted(by_class):
        group = by_class[value]
        # union_all leaves the former block boundary's vertices in straight edges: simplify(0) drops them.
        parts = shapely.get_parts(shapely.simplify(shapely.union_all([p.geometry for p in group]), 0))
        # Each piece lies in exactly one part: find it by a point inside the piece.
        tree = shapely.STRtree(parts)
        inner = shapely.point_on_surface([p.geometry for p in group])
        piece_idx, part_idx = tree.query(inner, predicate="within")
        pixels = np.bincount(part_idx, weights=[group[i].pixels for i in piece_idx], minlength=len(parts))
        conf = np.bincount(part_idx, weights=[group[i].confidence_sum for i in piece_idx], minlength=len(parts))
        merged.extend(Piece(value, part, int(pixels[k]), float(conf[k])) for k, part in enumerate(parts))
    return merged


def areas_m2(geoms: gpd.GeoSeries) -> np.ndarray:
    """Areas in square metres whatever the CRS's units."""
    crs = CRS.from_user_input(geoms.crs)
    if crs.is_geographic:
        return geoms.to_crs(EQUAL_AREA_CRS).area.to_numpy()
    factor = crs.linear_units_factor[1] if crs.linear_units_factor else 1.0
    return geoms.area.to_numpy() * factor**2


def pixel_area_m2(grid) -> float:
    """Area of one pixel of an output grid in m2 (at the grid's centre for geographic CRSs)."""
    crs = grid.crs
    if crs.is_geographic:
        west, south, east, north = grid.bounds
        cx, cy = (west + east) / 2, (south + north) / 2
        t = grid.affine
        px = shapely.box(cx, cy, cx + abs(t.a), cy + abs(t.e))
        return float(areas_m2(gpd.GeoSeries([px], crs=crs))[0])
    factor = crs.linear_units_factor[1] if crs.linear_units_factor else 1.0
    return grid.pixel_area * factor**2


COLUMNS = ["class_id", "class_name", "area_m2", "mean_confidence", "geometry"]


def to_geodataframe(pieces: list[Piece], crs: str, legend: dict[int, str]) -> gpd.GeoDataFrame:
    """One row per polygon, in a stable order (so reruns write identical files)."""
    if not pieces:
        return gpd.GeoDataFrame({c: [] for c in COLUMNS[:-1]}, geometry=[], crs=crs)[COLUMNS]
    values = np.array([p.class_id for p in pieces], dtype=np.uint8)
    pixels = np.array([p.pixels for p in pieces], dtype=np.float64)
    gdf = gpd.GeoDataFrame(
        {
            "class_id": values,
            "class_name": [legend.get(int(v), str(v)) for v in values],
            "mean_confidence": np.round(np.array([p.confidence_sum for p in pieces]) / np.maximum(pixels, 1), 2),
        },
        geometry=[p.geometry for p in pieces],
        crs=crs,
    )
    gdf["area_m2"] = areas_m2(gdf.geometry)
    bounds = gdf.geometry.bounds
    order = np.lexsort((bounds["minx"].to_numpy(), -bounds["maxy"].to_numpy(), gdf["class_id"].to_numpy()))
    return gdf.iloc[order].reset_index(drop=True)[COLUMNS]


def simplify_coverage(gdf: gpd.GeoDataFrame, tolerance: float) -> gpd.GeoDataFrame:
    """Simplify all polygons together so shared edges stay shared: no gaps, no overlaps."""
    out = gdf.copy()
    out["geometry"] = shapely.coverage_simplify(gdf.geometry.to_numpy(), tolerance, simplify_boundary=False)
    out["area_m2"] = areas_m2(out.geometry)
    return out
