"""Bands found by name, the files' scale and offset, and cloud masks: each mosaic equals the one
from the same pixels given as a plain 4-band file in the model's order."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import xarray as xr
from conftest import run_config, scene_arrays

from geoseg.jobs import run
from geoseg.runstate import RunError

CLOUD = (slice(60, 140), slice(200, 330))  # rows, cols of a cloud patch


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return scene_arrays(tmp_path_factory.mktemp("bands"), "ordered.tif", seed=17)


@pytest.fixture(scope="module")
def reference(scene, random_checkpoint, client2) -> np.ndarray:
    d, _, _ = scene
    return mosaic(d / "ordered.tif", d / "ref", random_checkpoint, client2)


@pytest.fixture(scope="module")
def clouded_reference(scene, random_checkpoint, client2) -> np.ndarray:
    """The same scene with the cloud patch set to nodata in every band."""
    d, bands, profile = scene
    data = bands.copy()
    data[:, CLOUD[0], CLOUD[1]] = 0
    write(d / "nodata_cloud.tif", data, profile, ["blue", "green", "red", "nir"])
    return mosaic(d / "nodata_cloud.tif", d / "cloud_ref", random_checkpoint, client2)


def write(path, data, profile, descriptions=None, scales=None, offsets=None, dtype="uint16"):
    with rasterio.open(path, "w", **{**profile, "count": len(data), "dtype": dtype}) as dst:
        dst.write(data.astype(dtype))
        if descriptions:
            dst.descriptions = descriptions
        if scales:
            dst.scales, dst.offsets = scales, offsets
    return path


def mosaic(paths, out, checkpoint, client, *overrides) -> np.ndarray:
    """The class mosaic of ``paths`` (one or a list)."""
    inputs = paths if isinstance(paths, list) else [paths]
    cfg = run_config(checkpoint, inputs, out, "output.block_size=256", "output.polygons=false", *overrides)
    assert run(cfg, client).ok
    return xr.open_zarr(out / "mosaic.zarr")["classes"].values


def test_bands_in_another_order_are_found_by_their_descriptions(scene, reference, random_checkpoint, client2):
    d, bands, profile = scene
    blue, green, red, nir = bands
    extra = np.full_like(blue, 1234)  # a band the model does not use
    write(d / "shuffled.tif", np.stack([nir, extra, red, blue, green]), profile, ["NIR", "B11", "red", "Blue", "green"])
    np.testing.assert_array_equal(mosaic(d / "shuffled.tif", d / "s", random_checkpoint, client2), reference)


def test_an_explicit_band_map_for_files_without_names(scene, reference, random_checkpoint, client2):
    d, bands, profile = scene
    blue, green, red, nir = bands
    write(d / "unnamed.tif", np.stack([nir, red, green, blue]), profile)
    got = mosaic(d / "unnamed.tif", d / "u", random_checkpoint, client2, "bands={blue: 4, green: 3, red: 2, nir: 1}")
    np.testing.assert_array_equal(got, reference)


def test_the_files_scale_and_offset_are_applied_before_normalisation(scene, reference, random_checkpoint, client2):
    d, bands, profile = scene
    stored = bands.astype(np.int64) * 2 + 100  # what a scaled product stores for the same values
    write(d / "scaled.tif", stored, profile, ["blue", "green", "red", "nir"], [0.5] * 4, [-50.0] * 4)
    np.testing.assert_array_equal(mosaic(d / "scaled.tif", d / "sc", random_checkpoint, client2), reference)


def test_a_missing_band_names_the_scene_and_the_band(scene, random_checkpoint, client2):
    d, bands, profile = scene
    path = write(d / "no_nir.tif", bands[:3], profile, ["blue", "green", "red"])
    with pytest.raises(
        RunError, match=r"no_nir.tif: has no band 'nir' for model band 'nir' \(its bands: blue, green, red\)"
    ):
        mosaic(path, d / "m", random_checkpoint, client2)


@pytest.mark.parametrize(
    "mask_codes, mask_config",
    [
        ((4, 9), "mask={band: SCL, invalid_values: [3, 8, 9, 10]}"),  # vegetation, cloud (high probability)
        ((0b0000_0001, 0b0000_1001), "mask={band: SCL, invalid_bits: [3]}"),  # QA: bit 3, cloud
    ],
)
def test_cloud_masks_make_nodata_exactly_like_nodata_in_the_file(
    scene, clouded_reference, random_checkpoint, client2, mask_codes, mask_config
):
    d, bands, profile = scene
    clear, cloud = mask_codes
    codes = np.full(bands.shape[1:], clear, dtype=np.uint16)
    codes[CLOUD] = cloud
    path = write(
        d / "with_mask.tif", np.concatenate([bands, codes[None]]), profile, ["blue", "green", "red", "nir", "SCL"]
    )
    got = mosaic(path, d / f"mask{clear}", random_checkpoint, client2, mask_config)
    assert (got[CLOUD] == 255).all()
    np.testing.assert_array_equal(got, clouded_reference)


def test_a_second_cloud_free_date_fills_the_cloud_with_latest(scene, reference, random_checkpoint, client2):
    d, bands, profile = scene
    codes = np.full(bands.shape[1:], 4, dtype=np.uint16)
    codes[CLOUD] = 9
    cloudy = write(
        d / "cloudy.tif", np.concatenate([bands, codes[None]]), profile, ["blue", "green", "red", "nir", "SCL"]
    )
    clear = write(
        d / "clear.tif",
        np.concatenate([bands, np.full_like(codes, 4)[None]]),
        profile,
        ["blue", "green", "red", "nir", "SCL"],
    )
    for path, when in ((cloudy, "2026-06-20T10:00:00"), (clear, "2026-06-10T10:00:00")):
        with rasterio.open(path, "r+") as dst:
            dst.update_tags(ACQUISITION_DATETIME=when)
    got = mosaic(
        [cloudy, clear],
        d / "latest",
        random_checkpoint,
        client2,
        "output.mosaic_rule=latest",
        "mask={band: SCL, invalid_values: [3, 8, 9, 10]}",
    )
    assert (got != 255).all()  # the older, clear date fills the newer one's cloud
    np.testing.assert_array_equal(got, reference)
