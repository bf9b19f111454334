"""Polygon layers written in batches: GeoPackage and GeoParquet grow as blocks finish.

FlatGeobuf cannot be appended to (its index is built when the file is closed), so it is
written once at the end from the finished GeoPackage.
"""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import pyogrio

LAYER = "landcover"


class LayerWriter:
    """Appends GeoDataFrames to one layer file; the format follows the suffix (.gpkg or .parquet)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if self.path.suffix not in (".gpkg", ".parquet"):
            raise ValueError(f"{self.path}: batched writing supports .gpkg and .parquet")
        if self.path.exists():
            self.path.unlink()
        self.count = 0
        self._parquet = None

    def write(self, gdf: gpd.GeoDataFrame) -> None:
        if gdf.empty:
            return
        if self.path.suffix == ".gpkg":
            pyogrio.write_dataframe(gdf, self.path, layer=LAYER, driver="GPKG", append=self.count > 0)
        else:
            self._write_parquet(gdf)
        self.count += len(gdf)

    def _write_parquet(self, gdf: gpd.GeoDataFrame) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq
        import shapely

        column = gdf.geometry.name
        table = pa.Table.from_pandas(gdf.drop(columns=column), preserve_index=False)
        table = table.append_column(column, pa.array(shapely.to_wkb(gdf.geometry.to_numpy()), type=pa.binary()))
        if self._parquet is None:
            geo = {  # GeoParquet 1.0 metadata; no bbox, as batches come one by one
                "version": "1.0.0",
                "primary_column": column,
                "columns": {
                    column: {
                        "encoding": "WKB",
                        "geometry_types": ["Polygon"],
                        "crs": gdf.crs.to_json_dict() if gdf.crs else None,
                    }
                },
            }
            self._schema = table.schema.with_metadata({b"geo": json.dumps(geo).encode()})
            self._parquet = pq.ParquetWriter(self.path, self._schema)
        self._parquet.write_table(table.cast(self._schema))

    def close(self) -> None:
        if self._parquet is not None:
            self._parquet.close()
            self._parquet = None
        if self.count == 0 and self.path.suffix == ".gpkg":  # an empty layer still opens in GIS tools
            pyogrio.write_dataframe(
                gpd.GeoDataFrame({"class_id": []}, geometry=[], crs=None), self.path, layer=LAYER, driver="GPKG"
            )


def write_flatgeobuf(source: Path, path: Path) -> None:
    """A FlatGeobuf copy of a finished layer."""
    path = Path(path)
    if path.exists():
        path.unlink()
    gdf = pyogrio.read_dataframe(source, layer=LAYER)
    pyogrio.write_dataframe(gdf, path, layer=LAYER, driver="FlatGeobuf")
