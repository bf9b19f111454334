"""GIS export of a finished run: COG structure, polygon quality, styles, quicklook, report."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import xarray as xr
from conftest import run_config
from PIL import Image
from rasterio.crs import CRS
from rasterio.warp import transform_bounds
from shapely.geometry import Polygon

from geoseg.jobs import export_run, run, run_config_of
from geoseg.synth import SceneSpec, write_scene
from geoseg.vectorize import sieve

NAMES = ["water", "forest", "grassland", "cropland", "built-up", "bare soil", "road"]
MMU = 9
TOLERANCE = 10.0  # metres: one pixel
HOLES = 40  # pixels


@pytest.fixture(scope="module")
def exported(tmp_path_factory, client2):
    d = tmp_path_factory.mktemp("export")
    scene = write_scene(SceneSpec(700, 520, seed=31), d / "scene.tif")[0]
    out = d / "run"
    assert run(run_config("builtin:demo", [scene], out, "output.block_size=256", "output.polygons=false"), client2).ok
    cfg = run_config_of(
        out,
        [
            f"vector.fill_holes_pixels={HOLES}",
            f"vector.mmu_pixels={MMU}",
            f"vector.simplify_tolerance={TOLERANCE}",
            "vector.formats=[gpkg, parquet, fgb]",
            "vector.reproject_to=EPSG:4326",
        ],
    )
    result = export_run(out, cfg, client2)
    return out, result


def test_cog_is_tiled_with_mode_overviews_colour_table_and_nodata(exported):
    out, _ = exported
    classes = xr.open_zarr(out / "mosaic.zarr")["classes"].values
    with rasterio.open(out / "classes.tif") as src:
        assert src.driver == "GTiff" and src.profile["tiled"]
        assert src.nodata == 255 and src.dtypes[0] == "uint8"
        assert src.overviews(1), "internal overviews expected"
        assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert src.compression.name.lower() == "deflate"
        cmap = src.colormap(1)
        assert cmap[0][:3] == (0x1F, 0x78, 0xB4)  # water's colour
        assert src.tags(1)["CLASS_4"] == "built-up"
        np.testing.assert_array_equal(src.read(1), classes)


def test_the_cogs_overviews_hold_each_windows_most_common_class(tmp_path):
    """Three pixels of forest and one of water at the corner a nearest overview samples, in every
    2 x 2 window: mode gives forest, nearest water, an average class 2 (neither)."""
    from rasterio.crs import CRS

    from geoseg import mosaic
    from geoseg.export import write_cog
    from geoseg.grid import OutputGrid
    from geoseg.tiling import iter_blocks

    classes = np.ones((1024, 1024), np.uint8)  # the COG's tiles are 512 px: one overview level
    classes[0::2, 0::2] = 5
    grid = OutputGrid(CRS.from_epsg(32633).to_wkt(), (10.0, 0.0, 500000.0, 0.0, -10.0, 5200000.0), 1024, 1024)
    store = tmp_path / "mosaic.zarr"
    mosaic.create_mosaic(store, grid, 512, {1: "forest", 5: "water"})
    for b in iter_blocks(1024, 1024, 512):
        mosaic.write_block(store, b, classes[b.region], np.full((512, 512), 90, np.uint8))
    write_cog(str(store), str(tmp_path / "classes.tif"), {1: "forest", 5: "water"}, {1: "#1b7837", 5: "#1f78b4"})
    with rasterio.open(tmp_path / "classes.tif") as src:
        assert src.overviews(1)[0] == 2
        assert (src.read(1, out_shape=(512, 512)) == 1).all()


def test_polygons_are_valid_non_overlapping_and_match_the_sieved_raster(exported):
    out, _ = exported
    gdf = gpd.read_file(out / "polygons.gpkg")
    assert list(gdf.columns) == ["class_id", "class_name", "area_m2", "mean_confidence", "geometry"]
    assert gdf.geometry.is_valid.all()
    # no overlaps: the union's area is the sum of the areas
    assert gdf.geometry.union_all().area == pytest.approx(gdf.geometry.area.sum(), rel=1e-9)
    classes = xr.open_zarr(out / "mosaic.zarr")["classes"].values
    sieved = sieve(sieve(classes, MMU), HOLES, enclosed_only=True)
    counts = np.bincount(sieved[sieved != 255], minlength=7)
    per_class = gdf.groupby("class_id")["area_m2"].sum()
    perimeter = gdf.groupby("class_id").apply(lambda g: g.geometry.length.sum())
    for k in range(7):
        # simplification moves edges by at most the tolerance: bound the area change by perimeter x tolerance
        assert abs(per_class.get(k, 0.0) - counts[k] * 100.0) <= 0.5 * perimeter.get(k, 0.0) * TOLERANCE + 1e-6
    # no speckle: every polygon is at least the minimum mapping unit (before simplification)
    assert (gdf["area_m2"] > 0.5 * MMU * 100).all()
    assert ((gdf["mean_confidence"] > 0) & (gdf["mean_confidence"] <= 100)).all()
    # holes below the threshold were filled (simplification may shave a ring by up to half)
    rings = [Polygon(r).area for geom in gdf.geometry for r in geom.interiors]
    assert rings and min(rings) > 0.5 * HOLES * 100


@pytest.mark.skipif(shutil.which("gdalinfo") is None, reason="gdalinfo (Debian's gdal-bin) not installed")
def test_gdalinfo_lists_the_class_names_as_categories(exported):
    out, _ = exported
    info = subprocess.run(["gdalinfo", str(out / "classes.tif")], capture_output=True, text=True, check=True).stdout
    listed = info[info.index("Categories:") :].splitlines()[1 : 1 + len(NAMES)]
    assert [line.strip() for line in listed] == [f"{k}: {name}" for k, name in enumerate(NAMES)]
    with rasterio.open(out / "classes.tif") as src:  # rasterio's own GDAL reads the same file
        assert src.overviews(1) and src.colormap(1)[0][:3] == (0x1F, 0x78, 0xB4)


def test_all_formats_and_the_reprojected_copy(exported):
    out, _ = exported
    base = gpd.read_file(out / "polygons.gpkg")
    for name in ("polygons.parquet", "polygons.fgb"):
        other = gpd.read_parquet(out / name) if name.endswith("parquet") else gpd.read_file(out / name)
        assert len(other) == len(base) and other.crs == base.crs
        np.testing.assert_allclose(np.sort(other["area_m2"]), np.sort(base["area_m2"]))
    geo = gpd.read_file(out / "polygons_epsg4326.gpkg")
    assert geo.crs.to_epsg() == 4326 and len(geo) == len(base)
    assert geo.total_bounds[0] == pytest.approx(15.0, abs=0.2) and 45 < geo.total_bounds[1] < 48


def test_export_records_its_layers_and_a_later_one_removes_those_no_longer_asked_for(exported, tmp_path, client2):
    out, result = exported
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["vector"]["mmu_pixels"] == MMU  # a later export or vectorize starts from these
    assert manifest["outputs"]["polygons_fgb_epsg4326"] == str(out / "polygons_epsg4326.fgb")
    # exported again, from a copy of the run, with the GeoPackage only
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    again = export_run(moved, run_config_of(moved, ["vector.formats=[gpkg]", "vector.reproject_to=null"]), client2)
    assert sorted(p.name for p in moved.glob("polygons*")) == ["polygons.gpkg", "polygons.qml", "polygons.sld"]
    outputs = json.loads((moved / "manifest.json").read_text())["outputs"]
    assert {k: v for k, v in outputs.items() if k.startswith("polygons")} == {"polygons": str(moved / "polygons.gpkg")}
    assets = json.loads(Path(again.files["item"]).read_text())["assets"]
    assert "polygons.gpkg" in assets and not {"polygons.parquet", "polygons_epsg4326.fgb"} & set(assets)
    # the run copied from keeps its own layers: they are not the copy's to remove
    assert {"polygons.parquet", "polygons_epsg4326.fgb"} <= {p.name for p in out.iterdir()}


def test_an_overwrite_with_another_model_removes_what_the_export_made_of_the_old_mosaic(
    exported, tmp_path, random_checkpoint, client2
):
    out, _ = exported
    replaced = tmp_path / "replaced"
    shutil.copytree(out, replaced)
    scene = out.parent / "scene.tif"
    cfg = run_config(random_checkpoint, [scene], replaced, "output.block_size=256", "output.overwrite=true")
    assert run(cfg, client2).ok
    old = {"classes.tif", "classes.tif.aux.xml", "classes.qml", "polygons.qml", "polygons.sld", "report.json"}
    assert not old & {p.name for p in replaced.iterdir()}
    assets = json.loads((replaced / "item.json").read_text())["assets"]
    assert not old & set(assets) and {"mosaic.zarr", "polygons.gpkg"} <= set(assets)
    assert old <= {p.name for p in out.iterdir()}  # the run copied from keeps its own


def test_styles_name_every_class_with_its_colour(exported):
    out, _ = exported
    raster = ET.parse(out / "classes.qml").getroot()
    entries = raster.findall(".//paletteEntry")
    assert [e.get("label") for e in entries] == NAMES
    assert entries[0].get("color") == "#1f78b4"
    vector = ET.parse(out / "polygons.qml").getroot()
    assert [c.get("label") for c in vector.findall(".//category")] == NAMES
    sld = ET.parse(out / "polygons.sld").getroot()
    ns = {"sld": "http://www.opengis.net/sld"}
    assert [r.find("sld:Name", ns).text for r in sld.findall(".//sld:Rule", ns)] == NAMES


def test_styles_keep_class_names_with_quotes_and_markup():
    from geoseg.export import pam_xml, raster_qml, vector_qml, vector_sld

    legend = {0: 'water "open"', 1: "forest & <wood>", 2: "it's grass"}
    colors = {0: "#1f78b4", 1: "#1b7837", 2: "#a6d96a"}
    names = list(legend.values())
    assert [e.get("label") for e in ET.fromstring(raster_qml(legend, colors)).iter("paletteEntry")] == names
    assert [c.get("label") for c in ET.fromstring(vector_qml(legend, colors)).iter("category")] == names
    sld = ET.fromstring(vector_sld(legend, colors))
    assert [n.text for n in sld.iter("{http://www.opengis.net/sld}Name")][1:] == names
    assert [c.text for c in ET.fromstring(pam_xml(legend)).iter("Category")] == names


def test_quicklook_and_report(exported):
    out, _ = exported
    with Image.open(out / "quicklook.png") as img:
        assert img.size[0] > 600 and img.size[1] > 400
        colours = {c for _, c in img.convert("RGB").getcolors(1 << 20)}
        assert (0x1B, 0x78, 0x37) in colours  # forest green is drawn
    report = json.loads((out / "report.json").read_text())
    classes = xr.open_zarr(out / "mosaic.zarr")["classes"].values
    assert report["valid_pixels"] == int((classes != 255).sum())
    assert sum(r["percent"] for r in report["classes"]) == pytest.approx(100.0)
    assert report["total_area_km2"] == pytest.approx((classes != 255).sum() * 100 / 1e6)
    md = (out / "report.md").read_text()
    assert all(f"| {name} |" in md for name in NAMES)


def test_export_of_a_folder_that_is_not_a_run(tmp_path):
    from geoseg.jobs import RunError

    with pytest.raises(RunError, match="not a geoseg run"):
        run_config_of(tmp_path, [])


def test_the_run_item_validates_and_describes_every_output(exported, tmp_path):
    out, _ = exported
    item = json.loads((out / "item.json").read_text())
    # the STAC core schema, offline: rustac on a copy without the extensions' schema URLs
    rustac = str(Path(sys.executable).parent / "rustac")
    (tmp_path / "core.json").write_text(json.dumps({**item, "stac_extensions": []}))
    assert subprocess.run([rustac, "validate", str(tmp_path / "core.json")], capture_output=True).returncode == 0
    (tmp_path / "broken.json").write_text(json.dumps({**item, "stac_extensions": [], "bbox": "everywhere"}))
    assert subprocess.run([rustac, "validate", str(tmp_path / "broken.json")], capture_output=True).returncode != 0
    expected = {"mosaic.zarr", "classes.tif", "polygons.gpkg", "polygons.parquet", "polygons.fgb", "quicklook.png"}
    assert expected | {"manifest.json", "report.json", "polygons_epsg4326.gpkg", "classes.tif.aux.xml"} <= set(
        item["assets"]
    )
    for asset in item["assets"].values():
        assert asset["href"].startswith("./") and (out / asset["href"]).exists(), asset["href"]
    assert item["assets"]["classes.tif"]["type"] == "image/tiff; application=geotiff; profile=cloud-optimized"
    assert item["assets"]["quicklook.png"]["roles"] == ["overview", "visual"]
    for name in ("mosaic.zarr", "classes.tif", "polygons.parquet"):
        classes = item["assets"][name]["classification:classes"]
        assert [(c["value"], c["description"]) for c in classes] == list(enumerate(NAMES))
    assert item["assets"]["mosaic.zarr"]["classification:classes"][0]["color_hint"] == "1F78B4"
    with rasterio.open(out.parent / "scene.tif") as src:
        west, south, east, north = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
        assert item["properties"]["proj:code"] == f"EPSG:{src.crs.to_epsg()}"
        assert item["properties"]["proj:shape"] == [src.height, src.width]
        assert item["properties"]["proj:transform"] == list(src.transform)[:6]
    bbox = item["bbox"]
    tol = 1e-6  # degrees (0.1 m): the outline is written to 7 decimals
    assert bbox[0] - tol <= west < east <= bbox[2] + tol and bbox[1] - tol <= south < north <= bbox[3] + tol
    assert bbox[2] - bbox[0] < 1.001 * (east - west)  # covers the scene, not much more
    manifest = json.loads((out / "manifest.json").read_text())
    assert item["properties"]["geoseg:model"]["sha256"] == manifest["model"]["sha256"]
    assert item["properties"]["processing:software"] == {"geoseg": manifest["geoseg_version"]}


def test_the_item_takes_its_dates_from_the_inputs():
    from geoseg.stac_item import run_item

    manifest = {
        "grid": {
            "crs_wkt": CRS.from_epsg(32633).to_wkt(),
            "transform": [10, 0, 500000, 0, -10, 5200000],
            "width": 100,
            "height": 50,
        },
        "scenes": [
            {"path": "a.tif", "status": "ok", "acquired": "2026-06-01T10:00:00"},
            {"path": "b.tif", "status": "ok", "acquired": "2026-06-11T10:00:00"},
            {"path": "c.tif", "status": "ok"},
        ],
    }
    item = run_item("runs/june", manifest, {0: "water"}, {}, ["mosaic.zarr"]).to_dict()
    assert item["id"] == "june"
    props = item["properties"]
    assert props["datetime"] is None
    assert (props["start_datetime"], props["end_datetime"]) == ("2026-06-01T10:00:00Z", "2026-06-11T10:00:00Z")
    manifest["scenes"] = manifest["scenes"][:1]
    assert run_item("runs/june", manifest, {}, {}, []).to_dict()["properties"]["datetime"] == "2026-06-01T10:00:00Z"
    # zones told and untold, and a date that is not ISO 8601: all in UTC, the bad one left out
    manifest["scenes"] = [
        {"path": "a.tif", "acquired": "2026-06-01T12:00:00+02:00"},
        {"path": "b.tif", "acquired": "2026-06-11"},
        {"path": "c.tif", "acquired": "2026/06/21 10:00"},
    ]
    props = run_item("runs/june", manifest, {}, {}, []).to_dict()["properties"]
    assert (props["start_datetime"], props["end_datetime"]) == ("2026-06-01T10:00:00Z", "2026-06-11T00:00:00Z")
