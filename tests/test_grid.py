"""A chosen output grid: CRS, pixel size and area of interest; scenes in two UTM zones warp onto it."""

from __future__ import annotations

import json

import pytest
import rasterio
import rioxarray  # noqa: F401  (the .rio accessor)
import xarray as xr
from conftest import run_config
from rasterio.crs import CRS
from rasterio.warp import transform_bounds

from geoseg.grid import chosen_grid, grid_from_scenes
from geoseg.jobs import run
from geoseg.runstate import RunError
from geoseg.scenes import open_scene
from geoseg.synth import SceneSpec, write_scene


@pytest.fixture(scope="module")
def two_zones(tmp_path_factory):
    """Two scenes that meet at 18 E, 47 N: the first in UTM 33, the second in UTM 34."""
    d = tmp_path_factory.mktemp("zones")
    west = write_scene(
        SceneSpec(400, 400, seed=41, origin=(724_069.0, 5_211_530.0), nodata_border=False), d / "utm33.tif"
    )[0]
    east = write_scene(
        SceneSpec(400, 400, seed=42, crs="EPSG:32634", origin=(271_930.0, 5_211_530.0), nodata_border=False),
        d / "utm34.tif",
    )[0]
    return west, east


def test_the_scenes_own_grid_keeps_its_lattice_and_another_is_aligned(two_zones):
    scenes = [open_scene(p) for p in two_zones]
    native = grid_from_scenes(scenes)
    assert chosen_grid(scenes) == native
    same = chosen_grid(scenes, "EPSG:32633", 10.0)
    assert same.affine == native.affine and (same.width, same.height) == (native.width, native.height)
    lambert = chosen_grid(scenes, "EPSG:3035", 20.0)
    assert lambert.crs == CRS.from_epsg(3035) and lambert.affine.a == 20.0 and lambert.affine.e == -20.0
    assert lambert.affine.c % 20 == 0 and lambert.affine.f % 20 == 0  # on multiples of the pixel size
    west, south, east, north = lambert.bounds
    for scene in scenes:  # covers both zones
        w, s, e, n = transform_bounds(scene.crs, lambert.crs, *scene.bounds)
        assert west <= w + 20 and east >= e - 20 and south <= s + 20 and north >= n - 20
    with pytest.raises(ValueError, match="outside every scene"):
        chosen_grid(scenes, "EPSG:3035", 20.0, (0.0, 0.0, 100.0, 100.0))


def test_scenes_in_two_utm_zones_warp_onto_a_chosen_grid_and_area(tmp_path, two_zones, client2):
    aoi = [17.98, 46.985, 18.02, 47.005]  # lon/lat, across the zone boundary
    cfg = run_config(
        "builtin:demo",
        list(two_zones),
        tmp_path / "out",
        "grid.crs=EPSG:3035",
        "grid.resolution=20",
        f"grid.aoi={aoi}",
        "tiling.tile_size=128",
        "output.block_size=256",
        "output.polygons=false",
    )
    assert run(cfg, client2).ok
    ds = xr.open_zarr(tmp_path / "out" / "mosaic.zarr")
    assert ds.rio.crs.to_epsg() == 3035 and ds.rio.resolution() == (20.0, -20.0)
    west, south, east, north = transform_bounds("EPSG:4326", "EPSG:3035", *aoi, densify_pts=21)
    got = ds.rio.bounds()
    assert got[0] <= west < got[0] + 20 and got[2] - 20 < east <= got[2]  # the AOI, snapped outward
    assert got[1] <= south < got[1] + 20 and got[3] - 20 < north <= got[3]
    classes = ds["classes"].values
    half = classes.shape[1] // 2
    assert (classes[:, : half - 10] != 255).mean() > 0.9 and (classes[:, half + 10 :] != 255).mean() > 0.9
    scenes = json.loads((tmp_path / "out" / "manifest.json").read_text())["scenes"]
    assert [s["status"] for s in scenes] == ["ok", "ok"]  # both zones were read
    with rasterio.open(two_zones[0]) as src:
        assert src.crs.to_epsg() == 32633


def test_an_area_of_interest_outside_every_scene_is_a_clear_error(tmp_path, two_zones, client2):
    cfg = run_config("builtin:demo", list(two_zones), tmp_path / "out", "grid.aoi=[2.0, 48.0, 2.1, 48.1]")
    with pytest.raises(RunError, match="grid: the area of interest lies outside every scene"):
        run(cfg, client2)
    assert not (tmp_path / "out").exists()


def test_an_area_of_interest_from_a_vector_file_in_another_crs(tmp_path, two_zones):
    import geopandas as gpd
    import shapely

    from geoseg.grid import aoi_bounds

    area = gpd.GeoDataFrame(geometry=[shapely.box(725_000, 5_208_000, 727_000, 5_211_000)], crs=32633)
    area.to_file(tmp_path / "aoi.geojson")
    bounds = aoi_bounds(str(tmp_path / "aoi.geojson"), "EPSG:4326", "EPSG:3035")
    assert bounds == pytest.approx(area.to_crs(3035).total_bounds)
    grid = chosen_grid([open_scene(p) for p in two_zones], "EPSG:3035", 20.0, bounds)
    assert grid.width == pytest.approx((bounds[2] - bounds[0]) / 20, abs=2)
    assert grid.height == pytest.approx((bounds[3] - bounds[1]) / 20, abs=2)


def test_an_area_of_interest_file_changed_under_its_name_changes_the_runs_fingerprint(tmp_path, two_zones):
    """Blocks of the old area must not be reused on the new grid: the rerun is refused (or starts over)."""
    import geopandas as gpd
    import shapely

    from geoseg.planning import plan_run

    def plan(box: tuple[float, float, float, float]):
        gpd.GeoDataFrame(geometry=[shapely.box(*box)], crs=32633).to_file(tmp_path / "aoi.geojson")
        cfg = run_config(
            "builtin:demo", list(two_zones), tmp_path / "out", f"grid.aoi={str(tmp_path / 'aoi.geojson')!r}"
        )
        return plan_run(cfg)

    first = plan((725_000, 5_208_000, 727_000, 5_211_000))
    same = plan((725_000, 5_208_000, 727_000, 5_211_000))
    moved = plan((725_000, 5_207_000, 727_000, 5_210_000))
    assert same.fingerprint == first.fingerprint
    assert moved.grid != first.grid and moved.fingerprint != first.fingerprint
