"""The traced polygons against GDAL's (rasterio.features.shapes, 4-connectivity), vertex for vertex."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from rasterio.features import shapes
from scipy import ndimage
from shapely.geometry import shape

from geoseg.polygonize import polygonize, regions
from geoseg.synth import SceneSpec, make_labels

NODATA = 255


def traced(classes: np.ndarray, weights: np.ndarray | None = None):
    result = polygonize(classes, NODATA, weights)
    geoms = shapely.from_ragged_array(
        shapely.GeometryType.POLYGON, result.ring_xy.astype(float), (result.ring_offsets, result.polygon_offsets)
    )
    return result, geoms


def gdal(classes: np.ndarray) -> list[tuple[int, shapely.Polygon]]:
    return [(int(v), shape(g)) for g, v in shapes(classes, mask=classes != NODATA, connectivity=4)]


def same_polygons(got: list[tuple[int, shapely.Polygon]], want: list[tuple[int, shapely.Polygon]]) -> bool:
    """Same classes and the same rings, vertex for vertex (each ring may start anywhere)."""

    def canonical(polys):
        return sorted((v, shapely.normalize(g).wkb) for v, g in polys)

    return canonical(got) == canonical(want)


def test_random_rasters_give_gdals_polygons_vertex_for_vertex(monkeypatch):
    """Small rasters of 1-4 classes, some with nodata: every pinch, hole and touching-hole
    pattern such rasters reach, hundreds of times over."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)  # with them, rasterio makes a boto3 session per shapes()
    rng = np.random.default_rng(7)
    for _ in range(1500):
        check_random_raster(rng)


def check_random_raster(rng: np.random.Generator) -> None:
    h, w = rng.integers(1, 13, 2)
    classes = rng.integers(0, rng.integers(1, 5), (h, w)).astype(np.uint8)
    if rng.random() < 0.3:
        classes[rng.random((h, w)) < 0.2] = NODATA
    result, geoms = traced(classes)
    assert same_polygons(list(zip(result.values, geoms, strict=True)), gdal(classes)), classes
    assert shapely.is_valid(geoms).all()
    np.testing.assert_array_equal(result.pixels, shapely.area(geoms))


@pytest.mark.parametrize(
    "rows",
    [
        # a ring of 1 closed only at a corner: GDAL gives a shell and a hole touching it there
        ["000000", "011100", "012210", "011110", "000000"],
        # two holes of 1 meeting at a corner
        ["11111", "12011", "10211", "11111"],
        # a checkerboard: every pixel its own polygon, touching only at corners
        ["0101", "1010", "0101"],
        # an island in a hole in an island
        ["0000000", "0111110", "0122210", "0123210", "0122210", "0111110", "0000000"],
    ],
)
def test_pinches_and_nested_holes_give_gdals_polygons(rows):
    classes = np.array([[int(c) for c in row] for row in rows], np.uint8)
    result, geoms = traced(classes)
    assert same_polygons(list(zip(result.values, geoms, strict=True)), gdal(classes))
    assert shapely.is_valid(geoms).all()


def test_a_raster_of_nodata_has_no_polygon():
    result = polygonize(np.full((4, 5), NODATA, np.uint8), NODATA)
    assert len(result.values) == 0 and len(result.ring_xy) == 0
    assert list(result.polygon_offsets) == [0] and list(result.ring_offsets) == [0]


def test_land_cover_gives_gdals_polygons_with_their_orientation_and_totals():
    """The synthetic land cover with a nodata corner and stripe: GDAL's polygons, the shells and
    holes turning as GDAL's do, and each polygon's pixels and weight sum those of its region
    labelled pixel by pixel (scipy)."""
    classes = make_labels(SceneSpec(520, 390, seed=5))
    classes[:40, :70] = NODATA
    classes[200:203, :] = NODATA
    weights = (np.arange(classes.size).reshape(classes.shape) * 7 % 101).astype(np.uint8)
    result, geoms = traced(classes, weights)
    want = gdal(classes)
    assert len(want) > 100 and any(g.interiors for _, g in want)
    assert same_polygons(list(zip(result.values, geoms, strict=True)), want)

    # orientation: every shell turns one way and every hole the other, as GDAL's do
    def turns(polys):
        shells = {bool(shapely.is_ccw(g.exterior)) for g in polys}
        holes = {bool(shapely.is_ccw(ring)) for g in polys for ring in g.interiors}
        return shells, holes

    assert turns(geoms) == turns([g for _, g in want]) and len(turns(geoms)[0]) == len(turns(geoms)[1]) == 1
    assert turns(geoms)[0] != turns(geoms)[1]

    # each polygon's pixels and weight sum, against the regions scipy labels
    total = {}
    for value in np.unique(classes[classes != NODATA]):
        regions, n = ndimage.label(classes == value)
        pixels = np.bincount(regions.ravel(), minlength=n + 1)[1:]
        sums = np.bincount(regions.ravel(), weights=weights.ravel(), minlength=n + 1)[1:].astype(np.int64)
        for k in range(n):
            total.setdefault(int(value), []).append((int(pixels[k]), int(sums[k])))
    got = {}
    for v, p, s in zip(result.values, result.pixels, result.weight_sums, strict=True):
        got.setdefault(int(v), []).append((int(p), int(s)))
    assert {v: sorted(t) for v, t in got.items()} == {v: sorted(t) for v, t in total.items()}


def test_polygons_come_in_the_raster_order_of_their_first_pixel():
    classes = np.array([[1, 1, 2], [3, 1, 2], [3, 3, 3]], np.uint8)
    assert list(polygonize(classes, NODATA).values) == [1, 2, 3]


def test_regions_are_scipys_4_connected_regions_of_each_class():
    classes = make_labels(SceneSpec(300, 260, seed=9))
    classes[100:104, :] = NODATA
    ids, region_class, sizes = regions(classes, NODATA)
    assert region_class[0] == NODATA and sizes[0] == (classes == NODATA).sum()
    assert (region_class[ids] == np.where(classes == NODATA, NODATA, classes)).all()
    np.testing.assert_array_equal(np.bincount(ids.ravel(), minlength=len(sizes)), sizes)
    n_scipy = 0
    for value in np.unique(classes[classes != NODATA]):
        labelled, n = ndimage.label(classes == value)
        n_scipy += n
        # the same partition: each scipy region is one of ours, and no two share one
        pairs = np.unique(np.stack([labelled[labelled > 0], ids[labelled > 0]]), axis=1)
        assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1] == n
    assert len(sizes) - 1 == n_scipy
    # ids in the raster order of each region's first pixel
    first = np.unique(ids[ids > 0], return_index=True)[1]
    assert (np.diff(first) > 0).all()


def test_weights_of_another_shape_are_refused():
    with pytest.raises(ValueError, match=r"weights of shape \(2, 2\) for classes of shape \(8, 8\)"):
        polygonize(np.zeros((8, 8), np.uint8), NODATA, np.ones((2, 2), np.uint8))
