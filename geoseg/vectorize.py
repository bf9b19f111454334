"""Class mosaic -> polygons: polygonize each block, then merge what block edges cut.

A polygon that does not reach an interior block edge is final as it comes out of its block.
The others are unioned per class across blocks and split back into connected parts, which
gives the polygons that polygonizing the whole mosaic at once would give (same
4-connectivity: parts that meet at a corner only stay separate). Each polygon carries its
pixel count and confidence sum, so attributes survive the merge exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass, field, fields

import geopandas as gpd
import numpy as np
import shapely
from rasterio.crs import CRS
from rasterio.transform import Affine
from scipy import ndimage

from geoseg.blending import NODATA
from geoseg.polygonize import PixelPolygons, neighbour_votes, polygonize, regions, union_shared_edges
from geoseg.tiling import Block

EQUAL_AREA_CRS = "EPSG:6933"  # for areas of mosaics in geographic coordinates
FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)


@dataclass(frozen=True)
class Polygons:
    """Polygons with what their attributes are computed from, as parallel arrays."""

    class_ids: np.ndarray  # int64
    geometries: np.ndarray  # shapely Polygons
    pixels: np.ndarray  # int64
    confidence_sums: np.ndarray  # float64

    def __len__(self) -> int:
        return len(self.class_ids)

    def take(self, index: np.ndarray) -> Polygons:
        """The polygons at ``index`` (integers or a boolean mask)."""
        return Polygons(self.class_ids[index], self.geometries[index], self.pixels[index], self.confidence_sums[index])

    @staticmethod
    def empty() -> Polygons:
        return Polygons(np.zeros(0, np.int64), np.empty(0, object), np.zeros(0, np.int64), np.zeros(0))

    @staticmethod
    def concat(parts: Iterable[Polygons]) -> Polygons:
        parts = [p for p in parts if len(p)]
        if not parts:
            return Polygons.empty()
        return Polygons(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(Polygons)))


@dataclass(frozen=True)
class BlockPolygons:
    """Polygons of one block: ``final`` ones are done, ``edge`` ones wait for the merge."""

    final: Polygons = field(default_factory=Polygons.empty)
    edge: Polygons = field(default_factory=Polygons.empty)  # in mosaic pixel coordinates until the merge


def label_regions(classes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """4-connected regions of equal class: region id per pixel (0 = nodata), each region's class and size."""
    return regions(classes, NODATA)


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
    labels, region_class, sizes = label_regions(classes)
    small = (sizes < min_pixels) & (np.arange(len(sizes)) > 0)
    if not small.any():
        return classes
    voters = np.full(len(sizes), -1, np.int64)
    voters[small] = np.arange(int(small.sum()))
    votes = neighbour_votes(labels, classes, voters, int(small.sum()), int(region_class[1:].max()) + 1, NODATA)
    winner = votes.argmax(axis=1)  # ties: the lowest class id
    has_vote = votes.max(axis=1) > 0
    if enclosed_only:
        has_vote &= (votes > 0).sum(axis=1) == 1
    new_class = region_class.copy()
    new_class[small] = np.where(has_vote, winner, region_class[small])
    new_class[0] = NODATA
    return new_class[labels].astype(classes.dtype, copy=False)


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
    values, ring_xy, ring_offsets, polygon_offsets, pixels, conf_sums = polygonize(classes, NODATA, confidence)
    if len(values) == 0:
        return BlockPolygons()
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
    # A vertex at every pixel corner along a shared edge: both sides then have the same unit
    # segments there, which the merge cancels (see merge_edge_polygons).
    ring_xy, ring_offsets = vertices_along(ring_xy, ring_offsets, edge_cols, edge_rows)
    mosaic_xy = (ring_xy + [block.cols.start, block.rows.start]).astype(np.float64)
    # finished polygons' vertices in the CRS, edge pieces' left in pixels for the merge
    vertex_polygon = np.repeat(np.arange(len(values)), np.diff(ring_offsets[polygon_offsets]))
    mapped = np.where(touches[vertex_polygon, None], mosaic_xy, mapped_xy(mosaic_xy, transform))
    geometries = shapely.from_ragged_array(shapely.GeometryType.POLYGON, mapped, (ring_offsets, polygon_offsets))
    polygons = Polygons(values, geometries, pixels, conf_sums.astype(np.float64))
    return BlockPolygons(final=polygons.take(~touches), edge=polygons.take(touches))


def mapped_xy(xy: np.ndarray, transform: Affine) -> np.ndarray:
    """Mosaic pixel coordinates (column, row) mapped by the mosaic's ``transform``."""
    return np.column_stack(transform * (xy[:, 0], xy[:, 1]))


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


def merge_edge_polygons(pieces: Polygons, transform: Affine) -> Polygons:
    """Union same-class pieces that share an edge across block boundaries; attributes add up.

    The pieces are in mosaic pixel coordinates (:func:`polygonize_block`), with a vertex at
    every pixel corner along block edges: the union cancels the edges they share and walks
    what is left as the polygonizer walks a raster (:func:`geoseg.polygonize.union_shared_edges`),
    so the merged polygons are the whole mosaic's. They are mapped by ``transform`` at the end."""
    if len(pieces) == 0:
        return pieces
    _, xy, (ring_offsets, polygon_offsets) = shapely.to_ragged_array(pieces.geometries)
    # pixel counts and confidence sums are whole numbers far below 2**53: exact in float64
    pixel_pieces = PixelPolygons(
        pieces.class_ids,
        xy.astype(np.int64),
        ring_offsets,
        polygon_offsets,
        pieces.pixels,
        pieces.confidence_sums.astype(np.int64),
    )
    union = union_shared_edges(pixel_pieces)
    geometries = shapely.from_ragged_array(
        shapely.GeometryType.POLYGON,
        mapped_xy(union.ring_xy.astype(np.float64), transform),
        (union.ring_offsets, union.polygon_offsets),
    )
    return Polygons(union.values, geometries, union.pixels, union.weight_sums.astype(np.float64))


def final_layer(
    part: BlockPolygons, crs: str, legend: dict[int, str], simplify_tolerance: float
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The rows of a block's finished polygons (:func:`layer_columns`)."""
    return layer_columns(part.final, crs, legend, simplify_tolerance)


def merged_layer(
    transform: Affine, crs: str, legend: dict[int, str], simplify_tolerance: float, *pieces: Polygons
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The rows of the polygons that edge ``pieces`` (one per block) merge into."""
    return layer_columns(merge_edge_polygons(Polygons.concat(pieces), transform), crs, legend, simplify_tolerance)


def areas_m2(geometries: np.ndarray, crs: str) -> np.ndarray:
    """Areas in square metres whatever the CRS's units."""
    geographic, factor = crs_units(crs)
    if geographic:
        return gpd.GeoSeries(geometries, crs=crs).to_crs(EQUAL_AREA_CRS).area.to_numpy()
    return shapely.area(geometries) * factor**2


@functools.lru_cache(maxsize=16)
def crs_units(crs: str) -> tuple[bool, float]:
    """Whether ``crs`` is geographic, and its linear unit in metres (parsed once per CRS)."""
    parsed = CRS.from_user_input(crs)
    if parsed.is_geographic:
        return True, 1.0
    return False, parsed.linear_units_factor[1] if parsed.linear_units_factor else 1.0


def pixel_area_m2(grid) -> float:
    """Area of one pixel of an output grid in m2 (at the grid's centre for geographic CRSs)."""
    crs = grid.crs
    if crs.is_geographic:
        west, south, east, north = grid.bounds
        cx, cy = (west + east) / 2, (south + north) / 2
        t = grid.affine
        px = shapely.box(cx, cy, cx + abs(t.a), cy + abs(t.e))
        return float(areas_m2(np.array([px]), grid.crs_wkt)[0])
    return grid.pixel_area * crs_units(grid.crs_wkt)[1] ** 2


COLUMNS = ["class_id", "class_name", "area_m2", "mean_confidence", "geometry"]


def layer_columns(
    polygons: Polygons, crs: str, legend: dict[int, str], simplify_tolerance: float = 0.0
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The polygon layer's attribute columns and geometries, one row per polygon in a stable
    order (so reruns write identical files); simplified as a coverage if asked (edges on this
    batch's outline stay exact, so batches still fit together)."""
    bounds = shapely.bounds(polygons.geometries).reshape(-1, 4)
    order = np.lexsort((bounds[:, 0], -bounds[:, 3], polygons.class_ids))
    geometries = polygons.geometries[order]
    if simplify_tolerance > 0 and len(polygons):  # in the stable order: its result depends on it
        geometries = shapely.coverage_simplify(geometries, simplify_tolerance, simplify_boundary=False)
    values = polygons.class_ids[order].astype(np.uint8)
    names = {int(v): legend.get(int(v), str(v)) for v in np.unique(values)}
    mean_confidence = polygons.confidence_sums[order] / np.maximum(polygons.pixels[order], 1)
    columns = {
        "class_id": values,
        "class_name": np.array([names[int(v)] for v in values], dtype=object),
        "area_m2": areas_m2(geometries, crs),
        "mean_confidence": np.round(mean_confidence, 2),
    }
    return columns, geometries


def to_geodataframe(polygons: Polygons, crs: str, legend: dict[int, str]) -> gpd.GeoDataFrame:
    """:func:`layer_columns` as a GeoDataFrame."""
    columns, geometries = layer_columns(polygons, crs, legend)
    return gpd.GeoDataFrame(columns, geometry=geometries, crs=crs)[COLUMNS]
