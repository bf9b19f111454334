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
