"""Polygon layers written in batches come out whole and in order, in both formats."""

from __future__ import annotations

import geopandas as gpd
import pyogrio
import pytest
import shapely

from geoseg import vector_io
from geoseg.vector_io import LayerWriter


@pytest.mark.parametrize("suffix", [".gpkg", ".parquet"])
def test_rows_held_between_writes_reach_the_file_in_order(tmp_path, monkeypatch, suffix):
    monkeypatch.setattr(vector_io, "BATCH_ROWS", 5)  # several flushes and a remainder at close
    frames = [
        gpd.GeoDataFrame(
            {"class_id": [k] * (k + 1)}, geometry=[shapely.box(k, i, k + 1, i + 1) for i in range(k + 1)], crs=32633
        )
        for k in range(6)
    ]
    writer = LayerWriter(tmp_path / f"layer{suffix}", "EPSG:32633")
    for frame in frames:
        writer.write(frame)
    writer.close()
    path = tmp_path / f"layer{suffix}"
    got = gpd.read_parquet(path) if suffix == ".parquet" else pyogrio.read_dataframe(path, layer=vector_io.LAYER)
    assert got["class_id"].tolist() == [k for k in range(6) for _ in range(k + 1)]
    assert got.crs.to_epsg() == 32633
    assert got.geometry.area.sum() == pytest.approx(21.0)
    assert writer.count == 21


def test_a_batch_is_written_once_its_vertices_reach_the_budget(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    monkeypatch.setattr(vector_io, "BATCH_VERTICES", 1000)
    writer = LayerWriter(tmp_path / "layer.parquet", "EPSG:32633")
    circle = shapely.Point(0, 0).buffer(10, quad_segs=100)  # 401 vertices
    for k in range(5):
        writer.write(gpd.GeoDataFrame({"class_id": [k]}, geometry=[circle], crs=32633))
    writer.close()
    # 3 polygons reach the budget (1203 vertices): written; the last 2 at close
    file = pq.ParquetFile(tmp_path / "layer.parquet")
    assert [file.metadata.row_group(g).num_rows for g in range(file.num_row_groups)] == [3, 2]
    assert gpd.read_parquet(tmp_path / "layer.parquet")["class_id"].tolist() == [0, 1, 2, 3, 4]


def test_geoparquet_is_1_1_with_a_bbox_covering_that_filters(tmp_path, monkeypatch):
    import json

    import pyarrow.parquet as pq

    monkeypatch.setattr(vector_io, "BATCH_ROWS", 10)  # one row group per batch of 10
    writer = LayerWriter(tmp_path / "layer.parquet", "EPSG:32633")
    for row in range(5):  # five bands of the mosaic, top to bottom, in block order
        boxes = [
            shapely.box(500_000 + 10 * c, 5_000_000 - 10 * row, 500_010 + 10 * c, 5_000_010 - 10 * row)
            for c in range(10)
        ]
        writer.write(gpd.GeoDataFrame({"class_id": [row] * 10}, geometry=boxes, crs=32633))
    writer.close()
    file = pq.ParquetFile(tmp_path / "layer.parquet")
    geo = json.loads(file.schema_arrow.metadata[b"geo"])
    assert geo["version"] == "1.1.0"
    covering = geo["columns"]["geometry"]["covering"]["bbox"]
    assert covering == {
        "xmin": ["bbox", "xmin"],
        "ymin": ["bbox", "ymin"],
        "xmax": ["bbox", "xmax"],
        "ymax": ["bbox", "ymax"],
    }
    assert file.num_row_groups == 5
    table = file.read()
    assert table.column("bbox").to_pylist()[12] == {
        "xmin": 500_020.0,
        "ymin": 4_999_990.0,
        "xmax": 500_030.0,
        "ymax": 5_000_000.0,
    }
    # each row group's bbox min/max say which band it holds, so a reader skips the other four
    stats = [file.metadata.row_group(g).column(table.schema.names.index("bbox") + 1).statistics for g in range(5)]
    assert file.metadata.row_group(0).column(table.schema.names.index("bbox") + 1).path_in_schema == "bbox.ymin"
    assert [(s.min, s.max) for s in stats] == [(5_000_000 - 10 * row, 5_000_000 - 10 * row) for row in range(5)]
    assert not file.metadata.row_group(0).column(table.schema.names.index("geometry")).is_stats_set
    # a spatial filter through the covering column returns the one band it touches
    band = gpd.read_parquet(tmp_path / "layer.parquet", bbox=(500_001, 4_999_971, 500_099, 4_999_979))
    assert sorted(set(band["class_id"])) == [3]
    assert len(gpd.read_parquet(tmp_path / "layer.parquet")) == 50


@pytest.mark.parametrize("suffix", [".gpkg", ".parquet"])
def test_an_older_layer_stays_until_the_new_one_is_closed_and_an_aborted_one_leaves_it(tmp_path, suffix):
    def polygons(n: int) -> gpd.GeoDataFrame:
        boxes = [shapely.box(i, 0, i + 1, 1) for i in range(n)]
        return gpd.GeoDataFrame({"class_id": [1] * n}, geometry=boxes, crs="EPSG:32633")

    def rows() -> int:
        path = tmp_path / f"polygons{suffix}"
        return len(gpd.read_parquet(path) if suffix == ".parquet" else gpd.read_file(path))

    older = LayerWriter(tmp_path / f"polygons{suffix}", "EPSG:32633")
    older.write(polygons(3))
    older.close()
    newer = LayerWriter(tmp_path / f"polygons{suffix}", "EPSG:32633")
    newer.write(polygons(9000))  # past a batch: rows reach a file, not the place of the layer
    assert rows() == 3
    newer.abort()  # a failed run: the older layer is all there is, and nothing else is left
    assert rows() == 3 and sorted(p.name for p in tmp_path.iterdir()) == [f"polygons{suffix}"]
    newest = LayerWriter(tmp_path / f"polygons{suffix}", "EPSG:32633")
    newest.write(polygons(5))
    newest.close()
    assert rows() == 5


@pytest.mark.parametrize("suffix", [".gpkg", ".parquet"])
def test_rows_that_do_not_fit_the_layer_fail_it_and_an_aborted_layer_takes_nothing_more(tmp_path, suffix):
    def boxes(n: int, **columns) -> gpd.GeoDataFrame:
        return gpd.GeoDataFrame(columns, geometry=[shapely.box(i, 0, i + 1, 1) for i in range(n)], crs="EPSG:32633")

    older = LayerWriter(tmp_path / f"polygons{suffix}", "EPSG:32633")
    older.write(boxes(3, class_id=[1] * 3))
    older.close()
    writer = LayerWriter(tmp_path / f"polygons{suffix}", "EPSG:32633")
    writer.write(boxes(5000, class_id=[1] * 5000))  # past a batch: the layer's columns are set
    with pytest.raises(ValueError, match="field names are not matching"):  # a column the layer lacks
        writer.write(boxes(5000, class_id=[2] * 5000, other=["x"] * 5000))
    writer.abort()
    with pytest.raises(RuntimeError, match="closed or aborted"):
        writer.write(boxes(1, class_id=[3]))
    path = tmp_path / f"polygons{suffix}"
    kept = gpd.read_parquet(path) if suffix == ".parquet" else gpd.read_file(path)
    assert kept["class_id"].tolist() == [1, 1, 1]  # the older layer, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"polygons{suffix}"]


WRITE_UNDER_A_FILE_SIZE_LIMIT = """
import resource, signal, sys
import geopandas as gpd, shapely
from geoseg.vector_io import LayerWriter
path, limit = sys.argv[1], int(sys.argv[2])
boxes = [shapely.box(i, 0, i + 1, 1) for i in range(3000)]
rows = gpd.GeoDataFrame({"class_id": [1] * 3000}, geometry=boxes, crs=32633)
if limit:  # a full disk, as the writing process meets it: EFBIG past the limit, not a signal
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
writer = LayerWriter(path, "EPSG:32633")
writer.write(rows)
try:
    writer.close()
except OSError as exc:
    writer.abort()
    sys.exit(str(exc))
"""


def test_a_geopackage_whose_spatial_index_the_disk_could_not_hold_fails_and_leaves_the_older_layer(tmp_path):
    """GDAL builds the index when it closes the file and reports no error if the disk is full:
    the layer would open without its index. The writer counts the index's rows instead."""
    import subprocess
    import sys

    whole = tmp_path / "whole.gpkg"
    subprocess.run([sys.executable, "-c", WRITE_UNDER_A_FILE_SIZE_LIMIT, str(whole), "0"], check=True)
    assert vector_io.indexed_rows(whole) == 3000
    older = LayerWriter(tmp_path / "polygons.gpkg", "EPSG:32633")
    older.write(gpd.GeoDataFrame({"class_id": [7]}, geometry=[shapely.box(0, 0, 1, 1)], crs=32633))
    older.close()
    # room for the rows, not for their index (the index is about a third of the file)
    limit = str(int(whole.stat().st_size * 0.9))
    failed = subprocess.run(
        [sys.executable, "-c", WRITE_UNDER_A_FILE_SIZE_LIMIT, str(tmp_path / "polygons.gpkg"), limit],
        capture_output=True,
        text=True,
    )
    assert failed.returncode == 1
    assert (
        failed.stderr.strip()
        == f"{tmp_path / 'polygons.gpkg'}: no spatial index was built for its 3000 polygons (disk full?)"
    )
    assert gpd.read_file(tmp_path / "polygons.gpkg")["class_id"].tolist() == [7]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["polygons.gpkg", "whole.gpkg"]
