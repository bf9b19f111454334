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
from conftest import run_config

from geoseg.runstate import RunError
from geoseg.synth import SceneSpec, write_scene
from pipelines.segment_scenes import run

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
    d = tmp_path_factory.mktemp("s2")
    path = write_scene(SceneSpec(400, 300, seed=23, nodata_border=False), d / "stacked.tif")[0]
    with rasterio.open(path) as src:
        return d, src.read(), src.profile


def mosaic(inputs, out, checkpoint, client, *overrides) -> np.ndarray:
    cfg = run_config(checkpoint, inputs, out, "output.block_size=256", "output.polygons=false", *overrides)
    assert run(cfg, client).ok
    return xr.open_zarr(out / "mosaic.zarr")["classes"].values


MASK = "mask={band: SCL, invalid_values: [3, 8, 9, 10]}"


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
            [str(d / "good.json")], d / "out_qa", random_checkpoint, client2, "mask={band: QA_PIXEL, invalid_bits: [3]}"
        )
