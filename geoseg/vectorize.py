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
from rasterio.transform import Affine
from scipy import ndimage

from geoseg.blending import NODATA
from geoseg.polygonize import polygonize
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
    edge: list[Piece] = field(default_factory=list)  # in mosaic pixel coordinates until the merge


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
    """Polygons of a block's class array, split by whether they touch an interior block edge.

    The block is polygonized in pixel coordinates (:func:`geoseg.polygonize.polygonize`, GDAL's
    polygons with each one's pixel count and confidence sum), everything after is vectorised
    over all vertices at once, and the vertices are mapped to the CRS from *mosaic* pixel
    coordinates, so that neighbouring blocks give the same floats for the vertices they share.
    """
    out = BlockPolygons()
    values, ring_xy, ring_offsets, polygon_offsets, pixels, conf_sums = polygonize(classes, NODATA, confidence)
    if len(values) == 0:
        return out
    rows, cols = classes.shape
    # The block edges its neighbours share (the mosaic's own edges are nobody's).
    edge_cols = [c for c, inner in ((0, block.cols.start > 0), (cols, block.cols.stop < width)) if inner]
    edge_rows = [r for r, inner in ((0, block.rows.start > 0), (rows, block.rows.stop < height)) if inner]
    # a shell's bounds are its polygon's (holes lie inside): compared in pixels, exactly
    shells = ring_offsets[polygon_offsets[:-1]]
    x, y = ring_xy[:, 0], ring_xy[:, 1]
    touches = np.zeros(len(values), dtype=bool)
    for reduce, side in ((np.minimum, 0), (np.maximum, 1)):
        touches |= np.isin(reduce.reduceat(x, shells), [c for c in edge_cols if (c > 0) == side])
        touches |= np.isin(reduce.reduceat(y, shells), [r for r in edge_rows if (r > 0) == side])
    # A vertex at every pixel corner along a shared edge: both sides then have the same vertices
    # there, and the merge is a coverage union (see merge_edge_polygons).
    ring_xy, ring_offsets = vertices_along(ring_xy, ring_offsets, edge_cols, edge_rows)
    mosaic_xy = (ring_xy + [block.cols.start, block.rows.start]).astype(np.float64)
    geometries = shapely.from_ragged_array(shapely.GeometryType.POLYGON, mosaic_xy, (ring_offsets, polygon_offsets))
    geometries[~touches] = to_crs(geometries[~touches], transform)
    for k, geometry in enumerate(geometries):
        piece = Piece(int(values[k]), geometry, int(pixels[k]), float(conf_sums[k]))
        (out.edge if touches[k] else out.final).append(piece)
    return out


def to_crs(geometries: np.ndarray, transform: Affine) -> np.ndarray:
    """Geometries in mosaic pixel coordinates (column, row) mapped by the mosaic's ``transform``."""
    return shapely.transform(geometries, lambda xy: np.column_stack(transform * (xy[:, 0], xy[:, 1])))


def vertices_along(
    ring_xy: np.ndarray, ring_offsets: np.ndarray, edge_cols: list[int], edge_rows: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Rings with a vertex added at every pixel corner of their edges that lie on the columns
    ``edge_cols`` or the rows ``edge_rows``; the new vertices and ring offsets."""
    x, y = ring_xy[:, 0], ring_xy[:, 1]
    dx, dy = np.zeros_like(x), np.zeros_like(y)
    dx[:-1], dy[:-1] = x[1:] - x[:-1], y[1:] - y[:-1]
    last = ring_offsets[1:] - 1  # a ring's closing vertex starts no edge
    dx[last] = dy[last] = 0
    on_edge = ((dx == 0) & np.isin(x, edge_cols)) | ((dy == 0) & np.isin(y, edge_rows))
    extra = np.where(on_edge, np.abs(dx) + np.abs(dy) - 1, 0)
    extra[last] = 0
    if not extra.any():
        return ring_xy, ring_offsets
    counts = 1 + extra
    ends = np.cumsum(counts)
    source = np.repeat(np.arange(len(x)), counts)
    step = np.arange(ends[-1]) - np.repeat(ends - counts, counts)  # 0 at the original vertex
    dense = np.column_stack((x[source] + step * np.sign(dx)[source], y[source] + step * np.sign(dy)[source]))
    return dense, np.concatenate([[0], ends])[ring_offsets]


def merge_edge_polygons(pieces: Iterable[Piece], transform: Affine) -> list[Piece]:
    """Union same-class pieces that share an edge across block boundaries; attributes add up.

    The pieces are in mosaic pixel coordinates (:func:`polygonize_block`), where the vertices
    the union leaves in straight edges are exactly collinear whatever the transform; the
    merged polygons are mapped by ``transform`` at the end."""
    by_class: dict[int, list[Piece]] = defaultdict(list)
    for piece in pieces:
        by_class[piece.class_id].append(piece)
    merged: list[Piece] = []
    for value in sorted(by_class):
        group = by_class[value]
        # The pieces of a class share their vertices along block edges (polygonize_block), so
        # they form a coverage: its union is linear-time. The vertices it leaves in straight
        # edges, where block edges were, are dropped.
        parts = drop_straight_vertices(shapely.get_parts(shapely.coverage_union_all([p.geometry for p in group])))
        # Each piece lies in exactly one part: find it by a point inside the piece.
        tree = shapely.STRtree(parts)
        inner = shapely.point_on_surface([p.geometry for p in group])
        piece_idx, part_idx = tree.query(inner, predicate="within")
        pixels = np.bincount(part_idx, weights=[group[i].pixels for i in piece_idx], minlength=len(parts))
        conf = np.bincount(part_idx, weights=[group[i].confidence_sum for i in piece_idx], minlength=len(parts))
        world = to_crs(parts, transform)
        merged.extend(Piece(value, part, int(pixels[k]), float(conf[k])) for k, part in enumerate(world))
    return merged


def drop_straight_vertices(polygons: np.ndarray) -> np.ndarray:
    """Polygons with pixel edges (in pixel coordinates: every edge is horizontal or vertical)
    without the vertices inside a straight run of edges. A vertex goes when its neighbours on
    the ring share its column, or its row: the shapes are unchanged, vectorised over all rings
    (what ``simplify(0)`` gives, 5x faster)."""
    if len(polygons) == 0:
        return polygons
    _, xy, (ring_offsets, polygon_offsets) = shapely.to_ragged_array(polygons)
    sizes = np.diff(ring_offsets)
    ring_of = np.repeat(np.arange(len(sizes)), sizes)
    index = np.arange(len(xy))
    closing = index == ring_offsets[1:][ring_of] - 1  # a ring's last vertex repeats its first
    before = index - 1
    before[ring_offsets[:-1]] = ring_offsets[1:] - 2  # the first vertex follows the last distinct one
    after = np.minimum(index + 1, len(xy) - 1)
    straight = np.zeros(len(xy), dtype=bool)
    for axis in (0, 1):
        straight |= (xy[before, axis] == xy[:, axis]) & (xy[:, axis] == xy[after, axis])
    keep = ~straight & ~closing
    kept = np.bincount(ring_of[keep], minlength=len(sizes))
    new_offsets = np.concatenate([[0], np.cumsum(kept + 1)])
    out = np.empty((new_offsets[-1], 2), dtype=xy.dtype)
    # each kept vertex at its ring's new start plus its rank among the ring's kept vertices
    position = np.repeat(new_offsets[:-1], kept) + np.arange(int(kept.sum())) - np.repeat(np.cumsum(kept) - kept, kept)
    out[position] = xy[keep]
    out[new_offsets[1:] - 1] = out[new_offsets[:-1]]  # closed again
    return shapely.from_ragged_array(shapely.GeometryType.POLYGON, out, (new_offsets, polygon_offsets))


def edge_pieces(part: BlockPolygons) -> list[Piece]:
    """The pieces of ``part`` cut by block edges (what the merge tasks need of a block)."""
    return part.edge


def polygon_layer(
    pieces: list[Piece], crs: str, legend: dict[int, str], simplify_tolerance: float = 0.0
) -> gpd.GeoDataFrame:
    """Pieces as rows of the polygon layer (:func:`to_geodataframe`), simplified as a coverage if asked."""
    gdf = to_geodataframe(pieces, crs, legend)
    if simplify_tolerance > 0 and len(gdf):
        # Edges on this batch's outline stay exact, so batches still fit together.
        gdf = simplify_coverage(gdf, simplify_tolerance)
    return gdf


def final_layer(part: BlockPolygons, crs: str, legend: dict[int, str], simplify_tolerance: float) -> gpd.GeoDataFrame:
    """The rows of a block's finished polygons."""
    return polygon_layer(part.final, crs, legend, simplify_tolerance)


def merged_layer(
    transform: Affine,
    crs: str,
    legend: dict[int, str],
    simplify_tolerance: float,
    groups: int,
    group: int,
    *pieces: list[Piece],
) -> gpd.GeoDataFrame:
    """The rows of the polygons that edge ``pieces`` (lists, one per block) of the classes in
    ``group`` (of ``groups``, by class id) merge into."""
    merged = merge_edge_polygons((p for part in pieces for p in part if p.class_id % groups == group), transform)
    return polygon_layer(merged, crs, legend, simplify_tolerance)


def layer_slice(gdf: gpd.GeoDataFrame, k: int, n: int) -> gpd.GeoDataFrame:
    """The ``k``-th of ``n`` consecutive, near-equal slices of a layer's rows."""
    return gdf.iloc[len(gdf) * k // n : len(gdf) * (k + 1) // n]


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
