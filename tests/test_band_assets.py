"""A Sentinel-2-L2A-like STAC Item: one COG per band, in another order than the model's, named
only in eo:bands, with raster:bands offsets, a 20 m band the model does not use and a 20 m
scene-classification asset with a cloud patch. Its mosaic equals that of the same scene given as
a stacked GeoTIFF with the cloud pixels set to nodata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import xarray as xr
from conftest import run_config, scene_arrays

from geoseg import storage
from geoseg.jobs import run
from geoseg.runstate import RunError

OFFSET = 1000  # L2A since processing baseline 04.00: stored = reflectance * 10000 + 1000
CLOUD_20M = (slice(30, 70), slice(100, 165))  # rows, cols at 20 m
S2_BANDS = {"B02": "blue", "B03": "green", "B04": "red", "B08": "nir"}


def cog(path: Path, data: np.ndarray, profile: dict, pixel: float, nodata: int | None) -> str:
    t = profile["transform"]
    height, width = data.shape
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=width,
        height=height,
        count=1,
        dtype=data.dtype,
        crs=profile["crs"],
        transform=rasterio.transform.Affine(pixel, 0, t.c, 0, -pixel, t.f),
        nodata=nodata,
        tiled=True,
        blockxsize=256,
        blockysize=256,
        compress="deflate",
    ) as dst:
        dst.write(data, 1)
    return path.name


def s2_item(d: Path, bands: np.ndarray, profile: dict, item_id: str, when: str, cloud: bool = True) -> dict:
    blue, green, red, nir = bands
    stored = {name: (band.astype(np.int32) + OFFSET) * (band > 0) for name, band in zip(S2_BANDS, bands, strict=True)}
    assets = {}
    for key in ("B08", "B04", "B02", "B03"):  # not the model's order
        href = cog(d / f"{item_id}_{key}.tif", stored[key].astype(np.uint16), profile, 10.0, 0)
        assets[key] = {
            "href": href,
            "type": "image/tiff; application=geotiff; profile=cloud-optimized",
            "roles": ["data"],
            "eo:bands": [{"name": key, "common_name": S2_BANDS[key]}],
            "raster:bands": [{"nodata": 0, "scale": 1.0, "offset": -OFFSET}],
        }
    # a 20 m band the model does not use, made by averaging
    b11 = nir.reshape(nir.shape[0] // 2, 2, nir.shape[1] // 2, 2).mean(axis=(1, 3)).astype(np.uint16)
    assets["B11"] = {
        "href": cog(d / f"{item_id}_B11.tif", b11, profile, 20.0, 0),
        "eo:bands": [{"name": "B11", "common_name": "swir16"}],
    }
    scl = np.full(b11.shape, 4, dtype=np.uint8)  # vegetation
    if cloud:
        scl[CLOUD_20M] = 9  # cloud, high probability
    assets["SCL"] = {
        "href": cog(d / f"{item_id}_SCL.tif", scl, profile, 20.0, None),
        "roles": ["data"],
        "raster:bands": [{"nodata": 0}],
    }
    return {
        "type": "Feature",
        "stac_version": "1.1.0",
        "id": item_id,
        "geometry": None,
        "properties": {"datetime": when},
        "links": [],
        "assets": assets,
    }


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return scene_arrays(tmp_path_factory.mktemp("s2"), "stacked.tif", seed=23)


def mosaic(inputs, out, checkpoint, client, *overrides) -> np.ndarray:
    cfg = run_config(checkpoint, inputs, out, "output.block_size=256", "output.polygons=false", *overrides)
    assert run(cfg, client).ok
    return xr.open_zarr(out / "mosaic.zarr")["classes"].values


MASK = "mask={asset: SCL, invalid_values: [3, 8, 9, 10]}"


def test_an_s2_like_item_equals_the_stacked_scene_with_the_cloud_as_nodata(scene, random_checkpoint, client2):
    d, bands, profile = scene
    item = s2_item(d, bands, profile, "S2B_T33TWN_20260614", "2026-06-14T10:05:59Z")
    (d / "item.json").write_text(json.dumps(item))
    got = mosaic([str(d / "item.json")], d / "from_item", random_checkpoint, client2, MASK)
    clouded = bands.copy()
    clouded[:, CLOUD_20M[0].start * 2 : CLOUD_20M[0].stop * 2, CLOUD_20M[1].start * 2 : CLOUD_20M[1].stop * 2] = 0
    with rasterio.open(d / "clouded.tif", "w", **profile) as dst:
        dst.write(clouded)
        dst.descriptions = ["blue", "green", "red", "nir"]
    want = mosaic([d / "clouded.tif"], d / "stacked_out", random_checkpoint, client2)
    np.testing.assert_array_equal(got, want)
    assert (got == 255).sum() == 2 * 40 * 2 * 65  # the cloud, at 10 m
    manifest = json.loads((d / "from_item" / "manifest.json").read_text())
    assert manifest["scenes"][0]["acquired"] == "2026-06-14T10:05:59Z"
    assert manifest["scenes"][0]["path"].endswith("item.json#S2B_T33TWN_20260614")


def test_a_second_cloud_free_date_fills_the_cloud(scene, random_checkpoint, client2):
    d, bands, profile = scene
    cloudy = s2_item(d, bands, profile, "late", "2026-06-24T10:05:59Z")
    clear = s2_item(d, bands, profile, "early", "2026-06-04T10:05:59Z", cloud=False)
    (d / "items.json").write_text(json.dumps({"type": "FeatureCollection", "features": [clear, cloudy]}))
    got = mosaic([str(d / "items.json")], d / "latest", random_checkpoint, client2, MASK, "output.mosaic_rule=latest")
    assert (got != 255).all()


def test_missing_bands_assets_and_hrefs_are_named(scene, random_checkpoint, client2):
    d, bands, profile = scene
    item = s2_item(d, bands, profile, "broken", "2026-06-14T10:05:59Z")
    no_nir = {**item, "id": "no_nir", "assets": {k: v for k, v in item["assets"].items() if k != "B08"}}
    gone = {
        **item,
        "id": "gone",
        "assets": {**item["assets"], "B04": {**item["assets"]["B04"], "href": "nowhere/B04.tif"}},
    }
    for bad, reason in ((no_nir, "has no asset for band 'nir'"), (gone, "asset 'B04'")):
        (d / f"{bad['id']}.json").write_text(json.dumps(bad))
        with pytest.raises(RunError, match=f"{bad['id']}.json#{bad['id']}: {reason}"):
            mosaic([str(d / f"{bad['id']}.json")], d / f"out_{bad['id']}", random_checkpoint, client2, MASK)
    (d / "good.json").write_text(json.dumps(item))
    with pytest.raises(RunError, match="has no mask asset 'QA_PIXEL'"):
        mosaic(
            [str(d / "good.json")],
            d / "out_qa",
            random_checkpoint,
            client2,
            "mask={asset: QA_PIXEL, invalid_bits: [3]}",
        )


@pytest.fixture
def stac_api(tmp_path, scene, bucket):
    """A real STAC API (`rustac serve`, memory backend) on 127.0.0.1 with two S2-like items,
    one in June and one in May, whose COGs are in a bucket of the loopback S3 server."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from rasterio.warp import transform_geom

    d, bands, profile = scene
    with rasterio.open(d / "stacked.tif") as src:
        west, south, east, north = src.bounds
        box = {
            "type": "Polygon",
            "coordinates": [[[west, south], [east, south], [east, north], [west, north], [west, south]]],
        }
        footprint = transform_geom(src.crs, "EPSG:4326", box)
    features = []
    for item_id, when in (("june", "2026-06-14T10:05:59Z"), ("may", "2026-05-20T10:05:59Z")):
        item = s2_item(d, bands, profile, f"api_{item_id}", when)
        for asset in item["assets"].values():
            loc = f"{bucket}/s2-l2a/{asset['href']}"
            storage.upload(d / asset["href"], loc)
            asset["href"] = loc
        lons, lats = zip(*footprint["coordinates"][0], strict=True)
        item.update(collection="s2-l2a", geometry=footprint, bbox=[min(lons), min(lats), max(lons), max(lats)])
        features.append(item)
    (tmp_path / "items.json").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    collection = {
        "type": "Collection", "stac_version": "1.1.0", "id": "s2-l2a", "description": "S2-like test scenes",
        "license": "proprietary", "links": [],
        "extent": {"spatial": {"bbox": [[-180, -90, 180, 90]]}, "temporal": {"interval": [[None, None]]}},
    }  # fmt: skip
    (tmp_path / "collection.json").write_text(json.dumps(collection))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rustac = str(Path(sys.executable).parent / "rustac")
    server = subprocess.Popen(
        [
            rustac,
            "serve",
            "--addr",
            f"127.0.0.1:{port}",
            str(tmp_path / "collection.json"),
            str(tmp_path / "items.json"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(url, timeout=1).read()
            break
        except OSError:
            time.sleep(0.1)
    yield url, footprint
    server.terminate()
    server.wait(timeout=10)


def test_a_stac_api_search_finds_the_scenes_and_the_run_completes(
    tmp_path, stac_api, scene, random_checkpoint, client2
):
    import subprocess
    import sys

    url, footprint = stac_api
    d, bands, profile = scene
    lons, lats = zip(*footprint["coordinates"][0], strict=True)
    bbox = f"{min(lons) - 0.01},{min(lats) - 0.01},{max(lons) + 0.01},{max(lats) + 0.01}"
    out = tmp_path / "out"
    res = subprocess.run(
        [
            str(Path(sys.executable).parent / "geoseg"), "run", "configs/demo.yaml",
            "--stac-api", url, "--collection", "s2-l2a", "--bbox", bbox, "--datetime", "2026-06-01/2026-06-30",
            "--out", str(out), "--set", f"model.checkpoint={random_checkpoint}", "--set", MASK,
            "--set", "output.block_size=256", "--set", "output.polygons=false", "--set", "tiling.tile_size=128",
            "--set", "tiling.overlap=16", "--set", "cluster.n_workers=1",
        ],
        capture_output=True, text=True, cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    scenes = json.loads((out / "manifest.json").read_text())["scenes"]
    assert [s["path"] for s in scenes] == [f"{url}/collections/s2-l2a/items/api_june#api_june"]  # May is not in June
    assert scenes[0]["acquired"] == "2026-06-14T10:05:59Z"
    june = json.loads((tmp_path / "items.json").read_text())["features"][0]  # the same item, from a file
    (tmp_path / "june.json").write_text(json.dumps(june))
    want = mosaic([str(tmp_path / "june.json")], tmp_path / "want", random_checkpoint, client2, MASK)
    np.testing.assert_array_equal(xr.open_zarr(out / "mosaic.zarr")["classes"].values, want)


@pytest.mark.parametrize("resampling", ["bilinear", "nearest"])
def test_a_model_band_at_20m_is_resampled_on_read(scene, random_checkpoint, client2, resampling):
    d, bands, profile = scene
    item = s2_item(d, bands, profile, f"coarse_{resampling}", "2026-06-14T10:05:59Z", cloud=False)
    red = bands[2].astype(np.int32) + OFFSET
    coarse = red.reshape(red.shape[0] // 2, 2, red.shape[1] // 2, 2).mean(axis=(1, 3)).round().astype(np.uint16)
    item["assets"]["B04"]["href"] = cog(d / f"coarse_{resampling}_B04.tif", coarse, profile, 20.0, 0)
    (d / f"coarse_{resampling}.json").write_text(json.dumps(item))
    got = mosaic(
        [str(d / f"coarse_{resampling}.json")],
        d / f"coarse_{resampling}",
        random_checkpoint,
        client2,
        f"resampling={resampling}",
    )
    (d / "fine.json").write_text(json.dumps(s2_item(d, bands, profile, "fine", "2026-06-14T10:05:59Z", cloud=False)))
    want = mosaic([str(d / "fine.json")], d / f"fine_{resampling}", random_checkpoint, client2)
    assert got.shape == want.shape == bands.shape[1:] and (got != 255).all()  # the 10 m grid, all read
    assert 0.6 < (got == want).mean() < 1.0  # the red band at 20 m changes some classes, not most


def test_the_vrt_covers_only_what_every_band_covers_and_a_numbered_mask_is_refused(scene):
    from rasterio.transform import Affine

    from geoseg.band_assets import BandSource, vrt_xml
    from geoseg.scenes import BandSelection, SceneError, open_scene

    d, bands, profile = scene

    def source(name: str, width: int, height: int, transform: Affine) -> BandSource:
        return BandSource(
            name, f"{name}.tif", width, height, transform, "EPSG:32633", "uint16", 0, 1.0, 0.0, "bilinear"
        )

    fine = source("blue", 400, 300, Affine(10, 0, 500_000, 0, -10, 5_200_000))
    coarse = source("nir", 150, 100, Affine(20, 0, 500_040, 0, -20, 5_199_980))
    with rasterio.open(vrt_xml([fine, coarse])) as vrt:  # the VRT's header alone: the files are not opened
        assert (vrt.width, vrt.height) == (300, 200)  # the coarse band's 500,040..503,040 x 5,197,980..5,199,980
        assert vrt.transform == Affine(10, 0, 500_040, 0, -10, 5_199_980)
    item = s2_item(d, bands, profile, "numbered", "2026-06-14T10:05:59Z")
    (d / "numbered.json").write_text(json.dumps(item))
    selection = BandSelection(names=("blue", "green", "red", "nir"), mask_band=5, invalid_values=(9,))
    with pytest.raises(SceneError, match="named by mask.asset"):
        open_scene(f"{d / 'numbered.json'}#numbered", selection=selection)
    # an explicit map is for files: an item's bands are found by their names
    named = open_scene(
        f"{d / 'numbered.json'}#numbered",
        selection=BandSelection(names=("blue", "green", "red", "nir"), explicit=(("blue", 3),)),
    )
    assert named.indexes == [1, 2, 3, 4] and named.offsets == (-1000.0,) * 4


def test_an_item_over_http_whose_server_refuses_head_reads_its_band_assets(scene, random_checkpoint, client2):
    """The band COGs of an item on a server that refuses HEAD (signed GET URLs, some CDNs) are
    read by GETs, in the workers as at planning: the same mosaic as the item on disk."""
    import http.server
    import threading
    from functools import partial

    from test_object_storage import GetOnlyHandler

    d, bands, profile = scene
    (d / "item_http.json").write_text(json.dumps(s2_item(d, bands, profile, "over_http", "2026-06-14T10:05:59Z")))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(GetOnlyHandler, directory=str(d)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/item_http.json"
        got = mosaic([url], d / "over_http", random_checkpoint, client2, MASK)
    finally:
        server.shutdown()
    want = mosaic([str(d / "item_http.json")], d / "item_on_disk", random_checkpoint, client2, MASK)
    np.testing.assert_array_equal(got, want)
    assert (got != 255).sum() > 0.5 * got.size
