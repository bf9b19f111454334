"""Windowed reads: validity from a nodata value, NaN, an internal mask, or none at all."""

import numpy as np
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.transform import Affine, from_origin
from rasterio.windows import Window

from geoseg.grid import OutputGrid
from geoseg.inference import InferenceSettings, Predictor
from geoseg.models.checkpoint import load_checkpoint
from geoseg.scenes import open_scene, read_window
from geoseg.segment import band_layout, read_tile_rows, reader_threads
from geoseg.tiling import Span, TileGrid

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


@pytest.mark.parametrize(
    ("layout", "block_rows", "layout_on_grid"),
    [
        ({"tiled": True, "blockxsize": 256, "blockysize": 256}, 256, (256, 30)),  # a COG's tiles
        ({"tiled": True, "blockxsize": 64, "blockysize": 64}, 64, (128, 30)),  # two rows of tiles a band
        ({"tiled": False, "blockysize": 7}, 7, (133, 30)),  # strips of 7 rows: 19 strips a band
        ({"tiled": False, "blockysize": 600}, 600, (128, 0)),  # strips too tall: a tile's height
    ],
)
def test_row_bands_are_whole_rows_of_the_files_blocks(tmp_path, layout, block_rows, layout_on_grid):
    path = tmp_path / "s.tif"
    data = bands("uint16")
    profile = {"driver": "GTiff", "width": 50, "height": 1000, "count": 3, "dtype": "uint16", "crs": "EPSG:32633"}
    with rasterio.open(path, "w", transform=TRANSFORM, **profile, **layout) as dst:
        dst.write(np.resize(data, (3, 1000, 50)))
    scene = open_scene(path)
    assert scene.block_rows == block_rows
    # the scene starts 30 rows below the output grid's top: its blocks' rows are offset by 30
    grid = OutputGrid(scene.crs_wkt, tuple(TRANSFORM * Affine.translation(0, -30))[:6], 50, 1030)
    assert band_layout(scene, grid, 128) == layout_on_grid
    # a scene warped onto the grid has no block rows to follow
    warped = OutputGrid(CRS.from_epsg(32632).to_wkt(), grid.transform, 50, 1030)
    assert band_layout(scene, warped, 128) == (128, 0)


@pytest.mark.parametrize(("layout", "threads"), [({"tiled": True, "blockxsize": 64, "blockysize": 64}, 3), ({}, 1)])
def test_tile_rows_read_in_bands_are_the_windows_read_directly(tmp_path, random_checkpoint, layout, threads):
    """Tile rows served from bands (views, or copies across two bands) hold exactly the pixels of
    a direct read of their window, halo and nodata included, in the order asked."""
    rng = np.random.default_rng(0)
    data = rng.integers(1, 5000, (4, 300, 200), dtype=np.uint16)
    data[:, 100:140, 50:90] = 0  # nodata
    profile = {"driver": "GTiff", "width": 200, "height": 300, "count": 4, "dtype": "uint16", "crs": "EPSG:32633"}
    with rasterio.open(tmp_path / "s.tif", "w", transform=TRANSFORM, nodata=0, **profile, **layout) as dst:
        dst.write(data)
    scene = open_scene(tmp_path / "s.tif")
    grid = OutputGrid(scene.crs_wkt, scene.transform, 200, 300)
    predictor = Predictor(
        load_checkpoint(str(random_checkpoint)), InferenceSettings(str(random_checkpoint), device="cpu")
    )
    tg, cols = TileGrid(64, 16), Span(40, 180)
    rows = range(0, tg.count(300))
    got = list(read_tile_rows([scene], grid, tg, rows, cols, predictor, {}, threads))
    assert len(got) == len(rows)
    for i, (bands, valid) in zip(rows, got, strict=True):
        window = Window(cols.start, tg.origin(i), cols.size, tg.tile_size)
        want, want_valid = read_window(scene, scene.crs, scene.affine, window)
        np.testing.assert_array_equal(valid, want_valid)
        np.testing.assert_array_equal(bands, predictor.normalize(want, want_valid))
    assert not got[0][1][:8].any() and got[0][1][8:].any()  # the halo above the scene is nodata


def test_one_reader_thread_on_cpu_unless_asked(random_checkpoint):
    """On CPU the cores run the model: one reader thread per block, or as many as configured."""
    predictor = Predictor(
        load_checkpoint(str(random_checkpoint)), InferenceSettings(str(random_checkpoint), device="cpu")
    )
    assert reader_threads(0, predictor) == 1
    assert reader_threads(3, predictor) == 3


def test_normalize_standardises_valid_pixels_and_zeroes_the_rest(random_checkpoint):
    predictor = Predictor(
        load_checkpoint(str(random_checkpoint)), InferenceSettings(str(random_checkpoint), device="cpu")
    )
    ckpt = predictor.ckpt
    raw = np.random.default_rng(1).integers(0, 4000, (len(ckpt.bands), 30, 40)).astype(np.float32)
    valid = np.ones((30, 40), bool)
    valid[3:9, 10:20] = False
    got = predictor.normalize(raw.copy(), valid)
    mean = np.asarray(ckpt.mean, np.float32)[:, None, None]
    std = np.asarray(ckpt.std, np.float32)[:, None, None]
    np.testing.assert_allclose(got[:, valid], ((raw - mean) / std)[:, valid], rtol=1e-5, atol=1e-5)
    assert (got[:, ~valid] == 0).all()
