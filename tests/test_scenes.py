"""Windowed reads: validity from a nodata value, NaN, an internal mask, or none at all."""

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

from geoseg.scenes import open_scene, read_window

TRANSFORM = from_origin(500_000, 5_200_000, 10, 10)


def write(path, data, nodata=None, mask=None):
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=data.shape[2],
        height=data.shape[1],
        count=data.shape[0],
        dtype=data.dtype,
        crs="EPSG:32633",
        transform=TRANSFORM,
        nodata=nodata,
    ) as dst:
        dst.write(data)
        if mask is not None:
            dst.write_mask(mask.astype(np.uint8) * 255)
    return open_scene(path)


def bands(dtype, fill=7):
    return np.full((3, 40, 50), fill, dtype=dtype)


@pytest.mark.parametrize("kind", ["nodata", "nan", "mask", "none"])
def test_validity_and_halo(tmp_path, kind):
    invalid = np.zeros((40, 50), bool)
    invalid[5:10, 20:30] = True  # in one band only: the pixel is unusable all the same
    if kind == "nodata":
        data = bands("uint16")
        data[1][invalid] = 0
        scene = write(tmp_path / "s.tif", data, nodata=0)
    elif kind == "nan":
        data = bands("float32")
        data[2][invalid] = np.nan
        scene = write(tmp_path / "s.tif", data, nodata=float("nan"))
    elif kind == "mask":
        data = bands("uint8")
        scene = write(tmp_path / "s.tif", data, mask=~invalid)
    else:
        data = bands("int16")
        invalid[:] = False
        scene = write(tmp_path / "s.tif", data)
    # a window reaching 4 px beyond the top-left corner: the halo is invalid
    got, valid = read_window(scene, scene.crs, scene.affine, Window(-4, -4, 30, 20))
    want = np.zeros((20, 30), bool)
    want[4:, 4:] = ~invalid[:16, :26]
    np.testing.assert_array_equal(valid, want)
    assert got.dtype == np.float32 and (got[:, valid] == 7).all() and (got[:, :4] == 0).all()
