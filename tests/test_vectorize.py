"""Vectorize maths without I/O: blockwise polygons + edge merge == polygonizing the whole array."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from rasterio.features import shapes
from rasterio.transform import from_origin
from shapely.geometry import shape

from geoseg.synth import SceneSpec, make_labels
from geoseg.tiling import iter_blocks
from geoseg.vectorize import merge_edge_polygons, polygonize_block, to_geodataframe

TRANSFORM = from_origin(500_000, 5_200_000, 10, 10)


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    arr = make_labels(SceneSpec(520, 390, seed=5))
    arr[:40, :70] = 255  # a nodata corner
    arr[200:203, :] = 255  # a nodata stripe crossing block edges
    return arr


def blockwise(labels: np.ndarray, block_size: int):
    h, w = labels.shape
    final, edge = [], []
    for b in iter_blocks(h, w, block_size):
        part = polygonize_block(labels[b.rows.start : b.rows.stop, b.cols.start : b.cols.stop], b, TRANSFORM, h, w)
        final += part.final
        edge += part.edge
    return final + merge_edge_polygons(edge)


def whole(labels: np.ndarray):
    return [(int(v), shape(g)) for g, v in shapes(labels, mask=labels != 255, connectivity=4, transform=TRANSFORM)]


def canonical(polys):
    return sorted(
        polys, key=lambda p: (p[0], round(p[1].area, 3), round(p[1].centroid.x, 3), round(p[1].centroid.y, 3))
    )


@pytest.mark.parametrize("block_size", [64, 100, 128])
def test_blockwise_polygons_equal_whole_mosaic_polygons(labels, block_size):
    got, want = canonical(blockwise(labels, block_size)), canonical(whole(labels))
    assert len(got) == len(want)
    for (cg, pg), (cw, pw) in zip(got, want, strict=True):
        assert cg == cw
        assert pg.is_valid
        assert shapely.equals(pg, pw), f"class {cg} polygon at {pw.centroid} differs"


def test_area_per_class_is_pixel_count_times_pixel_area(labels):
    gdf = to_geodataframe(blockwise(labels, 100), "EPSG:32633", {k: f"c{k}" for k in range(7)})
    counts = np.bincount(labels[labels != 255], minlength=7)
    per_class = gdf.groupby("class_id")["area_m2"].sum()
    for k, n in enumerate(counts):
        assert per_class.get(k, 0.0) == pytest.approx(n * 100.0)


def test_no_polygon_edge_runs_along_a_block_boundary_inside_one_class(labels):
    # Between two pixels of the same class there is never an edge, so the total boundary
    # length equals the number of class changes (times pixel size) plus the outer edges.
    polys = blockwise(labels, 64)
    perimeter = sum(p.length for _, p in polys)
    valid = labels != 255
    horiz = (labels[:, 1:] != labels[:, :-1]) & (valid[:, 1:] | valid[:, :-1])
    vert = (labels[1:, :] != labels[:-1, :]) & (valid[1:, :] | valid[:-1, :])
    both_valid_h = (labels[:, 1:] != labels[:, :-1]) & valid[:, 1:] & valid[:, :-1]
    both_valid_v = (labels[1:, :] != labels[:-1, :]) & valid[1:, :] & valid[:-1, :]
    outer = valid[:, 0].sum() + valid[:, -1].sum() + valid[0, :].sum() + valid[-1, :].sum()
    # an edge between two valid classes belongs to two polygons, one next to nodata to one
    edges = (
        2 * (both_valid_h.sum() + both_valid_v.sum())
        + (horiz.sum() - both_valid_h.sum())
        + (vert.sum() - both_valid_v.sum())
    )
    assert perimeter == pytest.approx((edges + outer) * 10.0)


def test_polygons_do_not_overlap(labels):
    gdf = to_geodataframe(blockwise(labels, 128), "EPSG:32633", {})
    assert gdf.geometry.union_all().area == pytest.approx(gdf.geometry.area.sum())


def test_geographic_crs_areas_are_in_square_metres():
    arr = np.zeros((10, 10), np.uint8)
    transform = from_origin(10.0, 50.0, 0.001, 0.001)
    b = next(iter_blocks(10, 10, 10))
    gdf = to_geodataframe(polygonize_block(arr, b, transform, 10, 10).final, "EPSG:4326", {0: "water"})
    # 0.01 deg x 0.01 deg at 50 N: about 1113 m x 715 m
    assert gdf["area_m2"].iloc[0] == pytest.approx(1113.2 * 715.6, rel=0.01)
