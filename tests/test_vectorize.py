"""Vectorize maths without I/O: blockwise polygons + edge merge == polygonizing the whole array."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import shapely
from rasterio.features import shapes
from rasterio.transform import Affine, from_origin
from shapely.geometry import shape

from geoseg.polygonize import polygonize
from geoseg.synth import SceneSpec, make_labels
from geoseg.tiling import iter_blocks
from geoseg.vectorize import Polygons, merge_edge_polygons, polygonize_block, sieve, sieve_halo, to_geodataframe

TRANSFORM = from_origin(500_000, 5_200_000, 10, 10)


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    arr = make_labels(SceneSpec(520, 390, seed=5))
    arr[:40, :70] = 255  # a nodata corner
    arr[200:203, :] = 255  # a nodata stripe crossing block edges
    return arr


@dataclass(frozen=True)
class Piece:
    class_id: int
    geometry: shapely.Polygon
    pixels: int


def pieces_of(polygons: Polygons) -> list[Piece]:
    return [
        Piece(int(v), g, int(p))
        for v, g, p in zip(polygons.class_ids, polygons.geometries, polygons.pixels, strict=True)
    ]


def blockwise_polygons(labels: np.ndarray, block_size: int, transform=TRANSFORM) -> Polygons:
    h, w = labels.shape
    final, edge = [], []
    for b in iter_blocks(h, w, block_size):
        part = polygonize_block(labels[b.rows.start : b.rows.stop, b.cols.start : b.cols.stop], b, transform, h, w)
        final.append(part.final)
        edge.append(part.edge)
    return Polygons.concat([*final, merge_edge_polygons(Polygons.concat(edge), transform)])


def blockwise(labels: np.ndarray, block_size: int, transform=TRANSFORM) -> list[Piece]:
    return pieces_of(blockwise_polygons(labels, block_size, transform))


def whole(labels: np.ndarray):
    return [
        Piece(int(v), shape(g), round(shape(g).area / 100))
        for g, v in shapes(labels, mask=labels != 255, connectivity=4, transform=TRANSFORM)
    ]


def canonical(polys):
    def key(p):
        c = p.geometry.centroid
        return p.class_id, round(p.geometry.area, 3), round(c.x, 3), round(c.y, 3)

    return sorted(polys, key=key)


@pytest.mark.parametrize("block_size", [64, 100, 128])
def test_blockwise_polygons_equal_whole_mosaic_polygons(labels, block_size):
    got, want = canonical(blockwise(labels, block_size)), canonical(whole(labels))
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.class_id == w.class_id
        assert g.geometry.is_valid
        assert shapely.equals(g.geometry, w.geometry), f"class {g.class_id} polygon at {w.geometry.centroid} differs"
        assert g.pixels == w.pixels  # attributes add up across the merge


def test_blockwise_polygons_on_a_rotated_grid_equal_whole_mosaic_polygons(labels):
    """Vertices left by the merge are dropped in pixel coordinates, where they are exactly in
    line; after a rotation they would not be."""
    rotated = TRANSFORM * Affine.rotation(30)
    got, want = (
        blockwise(labels, 64, rotated),
        [Piece(int(v), shape(g), 0) for g, v in shapes(labels, mask=labels != 255, connectivity=4, transform=rotated)],
    )
    got, want = canonical(got), canonical(want)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert len(shapely.get_coordinates(g.geometry)) == len(shapely.get_coordinates(w.geometry))
        assert shapely.equals_exact(shapely.normalize(g.geometry), shapely.normalize(w.geometry), tolerance=1e-6)


def test_area_per_class_is_pixel_count_times_pixel_area(labels):
    gdf = to_geodataframe(blockwise_polygons(labels, 100), "EPSG:32633", {k: f"c{k}" for k in range(7)})
    counts = np.bincount(labels[labels != 255], minlength=7)
    per_class = gdf.groupby("class_id")["area_m2"].sum()
    for k, n in enumerate(counts):
        assert per_class.get(k, 0.0) == pytest.approx(n * 100.0)


def test_no_polygon_edge_runs_along_a_block_boundary_inside_one_class(labels):
    # Between two pixels of the same class there is never an edge, so the total boundary
    # length equals the number of class changes (times pixel size) plus the outer edges.
    polys = blockwise(labels, 64)
    perimeter = sum(p.geometry.length for p in polys)
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
    gdf = to_geodataframe(blockwise_polygons(labels, 128), "EPSG:32633", {})
    assert gdf.geometry.union_all().area == pytest.approx(gdf.geometry.area.sum())


def test_geographic_crs_areas_are_in_square_metres():
    arr = np.zeros((10, 10), np.uint8)
    transform = from_origin(10.0, 50.0, 0.001, 0.001)
    b = next(iter_blocks(10, 10, 10))
    gdf = to_geodataframe(polygonize_block(arr, b, transform, 10, 10).final, "EPSG:4326", {0: "water"})
    # 0.01 deg x 0.01 deg at 50 N: about 1113 m x 715 m
    assert gdf["area_m2"].iloc[0] == pytest.approx(1113.2 * 715.6, rel=0.01)


def test_mean_confidence_survives_the_merge(labels):
    confidence = (np.arange(labels.size, dtype=np.int64).reshape(labels.shape) % 101).astype(np.uint8)
    h, w = labels.shape
    pieces = []
    edge = []
    for b in iter_blocks(h, w, 64):
        part = polygonize_block(
            labels[b.rows.start : b.rows.stop, b.cols.start : b.cols.stop],
            b,
            TRANSFORM,
            h,
            w,
            confidence[b.rows.start : b.rows.stop, b.cols.start : b.cols.stop],
        )
        pieces.append(part.final)
        edge.append(part.edge)
    polygons = Polygons.concat([*pieces, merge_edge_polygons(Polygons.concat(edge), TRANSFORM)])
    gdf = to_geodataframe(polygons, "EPSG:32633", {})
    from rasterio.features import rasterize

    for row in gdf.sample(25, random_state=0).itertuples():
        inside = rasterize([(row.geometry, 1)], out_shape=labels.shape, transform=TRANSFORM).astype(bool)
        assert row.mean_confidence == pytest.approx(confidence[inside].mean(), abs=0.006)


@pytest.mark.parametrize("mmu", [4, 20])
def test_sieve_with_a_halo_equals_sieving_the_whole_mosaic(labels, mmu):
    want = sieve(labels, mmu)
    h, w = labels.shape
    got = np.empty_like(labels)
    halo = sieve_halo(mmu)
    for b in iter_blocks(h, w, 64):
        r0, r1 = max(0, b.rows.start - halo), min(h, b.rows.stop + halo)
        c0, c1 = max(0, b.cols.start - halo), min(w, b.cols.stop + halo)
        part = sieve(labels[r0:r1, c0:c1], mmu)
        got[b.rows.start : b.rows.stop, b.cols.start : b.cols.stop] = part[
            b.rows.start - r0 : b.rows.stop - r0, b.cols.start - c0 : b.cols.stop - c0
        ]
    np.testing.assert_array_equal(got, want)


def test_sieve_absorbs_small_regions_into_the_majority_neighbour():
    arr = np.full((8, 8), 2, np.uint8)
    arr[:, 5:] = 3
    arr[3, 2] = 0  # a lone pixel inside class 2
    arr[2:4, 4:6] = 1  # a 4-pixel region between 2 and 3 (more 3 around it? 2: 3 px, 3: 4 px... see below)
    arr[0, 0] = 255
    out = sieve(arr, 5)
    assert out[3, 2] == 2
    assert out[0, 0] == 255
    assert set(np.unique(out[2:4, 4:6])) <= {2, 3}
    assert (sieve(arr, 1) == arr).all()
    # no region smaller than the MMU is left
    from geoseg.vectorize import label_regions

    _, _, sizes = label_regions(out)
    assert sizes[1:].min() >= 5


def test_fill_holes_fills_only_enclosed_regions():
    arr = np.full((12, 12), 2, np.uint8)
    arr[:, 8:] = 3
    arr[3:5, 3:5] = 0  # a 4-pixel hole inside class 2
    arr[5, 7:9] = 1  # a 2-pixel region touching both 2 and 3: not a hole
    out = sieve(arr, 10, enclosed_only=True)
    assert (out[3:5, 3:5] == 2).all()
    assert (out[5, 7:9] == 1).all()
    assert (out[arr == 3] == 3).all()


def test_hole_filling_with_a_halo_equals_the_whole_mosaic(labels):
    want = sieve(labels, 30, enclosed_only=True)
    assert not np.array_equal(want, labels)
    h, w = labels.shape
    halo = sieve_halo(30)
    got = np.empty_like(labels)
    for b in iter_blocks(h, w, 64):
        r0, r1 = max(0, b.rows.start - halo), min(h, b.rows.stop + halo)
        c0, c1 = max(0, b.cols.start - halo), min(w, b.cols.stop + halo)
        part = sieve(labels[r0:r1, c0:c1], 30, enclosed_only=True)
        got[b.rows.start : b.rows.stop, b.cols.start : b.cols.stop] = part[
            b.rows.start - r0 : b.rows.stop - r0, b.cols.start - c0 : b.cols.stop - c0
        ]
    np.testing.assert_array_equal(got, want)


def test_vertices_along_block_edges_leave_the_shape_unchanged():
    from geoseg.polygonize import polygonize
    from geoseg.vectorize import vertices_along

    classes = np.zeros((6, 8), np.uint8)
    classes[1:4, 2:5] = 1  # a hole in class 0
    values, ring_xy, ring_offsets, polygon_offsets, _, _ = polygonize(classes, 255)
    dense, dense_offsets = vertices_along(ring_xy, ring_offsets, [0], [6])
    before = shapely.from_ragged_array(
        shapely.GeometryType.POLYGON, ring_xy.astype(float), (ring_offsets, polygon_offsets)
    )
    after = shapely.from_ragged_array(
        shapely.GeometryType.POLYGON, dense.astype(float), (dense_offsets, polygon_offsets)
    )
    assert all(shapely.equals(before, after))
    coords = shapely.get_coordinates(after[list(values).index(0)])
    # every pixel corner of column 0 and row 6, once each (the ring's closing vertex repeats its first)
    assert set(coords[coords[:, 0] == 0][:, 1]) == set(range(7))
    assert set(coords[coords[:, 1] == 6][:, 0]) == set(range(9))
    assert len(shapely.get_coordinates(after[list(values).index(1)])) == 5  # inner square: untouched


def test_merged_random_rasters_are_the_whole_rasters_polygons_vertex_for_vertex():
    """Small random rasters cut into small blocks: the finished pieces and the merge of the
    edge pieces are the whole raster's polygons, ring for ring and vertex for vertex (a vertex
    only where a ring turns), with the same pixel counts and confidence sums. Pinches, holes
    and nodata fall on block edges and corners hundreds of times."""
    rng = np.random.default_rng(11)
    for _ in range(400):
        h, w = (int(n) for n in rng.integers(2, 25, 2))
        classes = rng.integers(0, rng.integers(1, 4), (h, w)).astype(np.uint8)
        if rng.random() < 0.3:
            classes[rng.random((h, w)) < 0.15] = 255
        confidence = rng.integers(0, 101, (h, w)).astype(np.uint8)
        size = int(rng.integers(2, 9))
        final, edge = [], []
        for b in iter_blocks(h, w, size):
            window = (slice(b.rows.start, b.rows.stop), slice(b.cols.start, b.cols.stop))
            part = polygonize_block(classes[window], b, Affine.identity(), h, w, confidence[window])
            final.append(part.final)
            edge.append(part.edge)
        got = Polygons.concat([*final, merge_edge_polygons(Polygons.concat(edge), Affine.identity())])
        want = polygonize(classes, 255, confidence)
        want_geoms = shapely.from_ragged_array(
            shapely.GeometryType.POLYGON, want.ring_xy.astype(float), (want.ring_offsets, want.polygon_offsets)
        )

        def rows(values, geoms, pixels, sums):
            normal = shapely.normalize(geoms)
            return sorted(
                zip(
                    np.asarray(values).tolist(),
                    shapely.to_wkb(normal),
                    np.asarray(pixels).tolist(),
                    np.asarray(sums).tolist(),
                    strict=True,
                )
            )

        assert rows(got.class_ids, got.geometries, got.pixels, got.confidence_sums) == rows(
            want.values, want_geoms, want.pixels, want.weight_sums.astype(float)
        ), (classes, size)
        assert shapely.is_valid(got.geometries).all()


def test_pieces_that_are_not_a_rasters_are_refused_by_the_merge():
    """The merge trusts the polygonizer's orientation (region on the left in pixel coordinates):
    pieces turned the other way are an error, not a crash or invalid polygons."""
    classes = np.array([[0, 0, 1, 1], [0, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 1]], np.uint8)
    edge = Polygons.concat(
        polygonize_block(
            classes[b.rows.start : b.rows.stop, b.cols.start : b.cols.stop], b, Affine.identity(), 4, 4
        ).edge
        for b in iter_blocks(4, 4, 2)
    )
    merge_edge_polygons(edge, Affine.identity())  # as they come: fine
    reversed_rings = Polygons(edge.class_ids, shapely.reverse(edge.geometries), edge.pixels, edge.confidence_sums)
    with pytest.raises(ValueError, match="not a raster's polygons"):
        merge_edge_polygons(reversed_rings, Affine.identity())


def test_a_blocks_polygons_wait_for_every_block_its_sieve_reads():
    from geoseg.blocks import sieve_reach

    blocks = {(b.row, b.col): b for b in iter_blocks(640, 640, 128)}  # 5 x 5 blocks
    centre = blocks[(2, 2)]
    assert sieve_reach(centre, blocks, 0, 128) == [centre]
    assert {(b.row, b.col) for b in sieve_reach(centre, blocks, 100, 128)} == {
        (r, c) for r in (1, 2, 3) for c in (1, 2, 3)
    }
    wide = sieve_reach(centre, blocks, 129, 128)  # a halo wider than a block reaches two blocks away
    assert len(wide) == 25 and wide[0] is centre
    corner = sieve_reach(blocks[(0, 0)], blocks, 129, 128)
    assert {(b.row, b.col) for b in corner} == {(r, c) for r in range(3) for c in range(3)}


def test_the_sieve_keeps_the_classes_dtype():
    """Codes above 255 (a uint16 map of change transitions, say) come out as they went in."""
    classes = np.full((8, 8), 300, np.uint16)
    classes[3, 3] = 301  # a speck: absorbed
    classes[:, 6:] = 254
    sieved = sieve(classes, 4)
    assert sieved.dtype == np.uint16
    np.testing.assert_array_equal(np.unique(sieved), [254, 300])
