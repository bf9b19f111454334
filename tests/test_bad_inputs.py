"""Bad scenes: a clear error naming the file and the reason; the good scenes still complete."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.shutil
import rioxarray  # noqa: F401  (registers .rio)
import xarray as xr
from conftest import run_config
from rasterio.transform import from_origin

from geoseg.inference import InferenceSettings
from geoseg.jobs import RunError, run
from geoseg.scenes import SceneError, open_scene
from geoseg.synth import SceneSpec, write_scene


def item_collection(*items: tuple[str, str | None, str]) -> str:
    """A STAC ItemCollection of (id, datetime or None, href of the "image" asset), as JSON."""
    features = [
        {
            "type": "Feature",
            "id": id_,
            "properties": {"datetime": when} if when else {},
            "assets": {"image": {"href": href}},
        }
        for id_, when, href in items
    ]
    return json.dumps({"type": "FeatureCollection", "features": features})


@pytest.fixture(scope="module")
def bad_scenes(tmp_path_factory, scene_1000x700):
    d = tmp_path_factory.mktemp("bad")
    good = scene_1000x700[0]
    truncated = d / "truncated.tif"
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    # a COG has its header first: the header survives, the pixel data does not
    cog = d / "cog.tif"
    rasterio.shutil.copy(good, cog, driver="COG")
    truncated_cog = d / "truncated_cog.tif"
    data = cog.read_bytes()
    truncated_cog.write_bytes(data[: int(len(data) * 0.6)])
    text = d / "notes.tif"
    text.write_text("this is not a raster\n")
    no_crs = d / "no_crs.tif"
    with rasterio.open(
        no_crs,
        "w",
        driver="GTiff",
        width=64,
        height=64,
        count=4,
        dtype="uint16",
        transform=from_origin(500_000, 5_200_000, 10, 10),
    ) as dst:
        dst.write(np.ones((4, 64, 64), np.uint16))
    three_bands = d / "three_bands.tif"
    with rasterio.open(good) as src:
        profile = src.profile
        profile.update(count=3)
        with rasterio.open(three_bands, "w", **profile) as dst:
            dst.write(src.read([1, 2, 3]))
    return {
        "truncated": truncated,
        "truncated_cog": truncated_cog,
        "text": text,
        "no_crs": no_crs,
        "three_bands": three_bands,
    }


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("truncated", "a TIFF that cannot be read, truncated or corrupt"),
        ("truncated_cog", "cannot read pixel data"),
        ("text", "not a readable raster"),
        ("no_crs", "has no CRS"),
        ("three_bands", "has 3 bands, the model expects 4"),
    ],
)
def test_bad_scene_errors_name_the_file_and_reason(bad_scenes, name, reason):
    with pytest.raises(SceneError) as err:
        open_scene(bad_scenes[name], expected_bands=4)
    assert str(bad_scenes[name]) in str(err.value)
    assert reason in str(err.value)


def test_good_scenes_complete_when_others_fail(tmp_path, bad_scenes, random_checkpoint, scene_1000x700, client2):
    inputs = [
        bad_scenes["truncated"],
        scene_1000x700[0],
        bad_scenes["truncated_cog"],
        bad_scenes["text"],
        bad_scenes["no_crs"],
        bad_scenes["three_bands"],
    ]
    result = run(run_config(random_checkpoint, inputs, tmp_path, "output.block_size=512"), client2)
    assert not result.ok
    assert set(result.failed_scenes) == {
        str(bad_scenes[k]) for k in ("truncated", "truncated_cog", "text", "no_crs", "three_bands")
    }
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    failed = {s["path"]: s["error"] for s in manifest["scenes"] if s["status"] == "failed"}
    assert "has no CRS" in failed[str(bad_scenes["no_crs"])]
    classes = xr.open_zarr(tmp_path / "mosaic.zarr")["classes"].values
    assert classes.shape == (700, 1000) and (classes != 255).mean() > 0.8


def test_no_usable_scene_is_a_run_error(tmp_path, bad_scenes, random_checkpoint, client2):
    with pytest.raises(RunError, match="no usable input scene"):
        run(run_config(random_checkpoint, [bad_scenes["text"]], tmp_path), client2)


def test_scene_smaller_than_a_tile_and_odd_path(tmp_path, random_checkpoint, client2):
    scene = tmp_path / "dir with spaces" / "scène été.tif"
    write_scene(SceneSpec(50, 37, seed=8, nodata_border=False), scene)
    result = run(run_config(random_checkpoint, [scene], tmp_path / "out"), client2)
    assert result.ok
    classes = xr.open_zarr(tmp_path / "out" / "mosaic.zarr")["classes"].values
    assert classes.shape == (37, 50) and (classes != 255).all()


def test_all_nodata_scene_is_reported_and_the_good_one_completes(tmp_path, random_checkpoint, client2):
    empty = tmp_path / "empty.tif"
    with rasterio.open(
        empty,
        "w",
        driver="GTiff",
        width=300,
        height=200,
        count=4,
        dtype="uint16",
        nodata=0,
        crs="EPSG:32633",
        transform=from_origin(501_000, 5_200_000, 10, 10),
    ) as dst:
        dst.write(np.zeros((4, 200, 300), np.uint16))
    good = write_scene(SceneSpec(100, 200, seed=4, nodata_border=False), tmp_path / "good.tif")[0]
    result = run(run_config(random_checkpoint, [good, empty], tmp_path / "out"), client2)
    assert result.failed_scenes == {str(empty): "all pixels are nodata"}
    classes = xr.open_zarr(tmp_path / "out" / "mosaic.zarr")["classes"].values
    assert classes.shape == (200, 400)
    assert (classes[:, :100] != 255).all() and (classes[:, 100:] == 255).all()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert {"path": str(empty), "status": "failed", "error": "all pixels are nodata"} in manifest["scenes"]


def test_unsupported_dtype_is_named(tmp_path):
    path = tmp_path / "complex.tif"
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=32,
        height=32,
        count=4,
        dtype="complex64",
        crs="EPSG:32633",
        transform=from_origin(500_000, 5_200_000, 10, 10),
    ) as dst:
        dst.write(np.ones((4, 32, 32), np.complex64))
    with pytest.raises(SceneError, match="unsupported data type complex64"):
        open_scene(path, 4)


def test_latest_acquisition_wins_where_scenes_overlap(tmp_path, random_checkpoint, client2):
    from geoseg.catalog import order_scenes

    old = write_scene(SceneSpec(200, 150, seed=1, nodata_border=False), tmp_path / "old.tif")[0]
    new = write_scene(SceneSpec(200, 150, seed=2, nodata_border=False), tmp_path / "new.tif")[0]
    items = item_collection(("old", "2024-05-01T10:00:00Z", "old.tif"), ("new", "2025-05-01T10:00:00Z", "new.tif"))
    (tmp_path / "items.json").write_text(items)
    maps = {}
    for rule, inputs in (("first", [old]), ("first", [new]), ("latest", [tmp_path / "items.json"])):
        out = tmp_path / f"{rule}_{inputs[0].stem}"
        run(run_config(random_checkpoint, inputs, out, f"output.mosaic_rule={rule}", "output.polygons=false"), client2)
        maps[out.name] = xr.open_zarr(out / "mosaic.zarr")["classes"].values
    np.testing.assert_array_equal(maps["latest_items"], maps["first_new"])
    assert not np.array_equal(maps["first_old"], maps["first_new"])
    manifest = json.loads((tmp_path / "latest_items" / "manifest.json").read_text())
    assert {s["path"]: s["status"] for s in manifest["scenes"]} == {str(new): "ok", str(old): "unused"}
    # STAC documents that cannot be used are bad inputs, each named with its reason: the run goes on
    (tmp_path / "array.json").write_text("[]")
    other = {"type": "Feature", "id": "x", "properties": {}, "assets": {"visual": {"href": "new.tif"}}}
    (tmp_path / "visual.json").write_text(json.dumps(other))
    inputs = [tmp_path / "items.json", tmp_path / "array.json", tmp_path / "missing.json", tmp_path / "visual.json"]
    out = tmp_path / "with_bad"
    cfg = run_config(random_checkpoint, inputs, out, "output.mosaic_rule=latest", "output.polygons=false")
    assert not run(cfg, client2).ok
    np.testing.assert_array_equal(xr.open_zarr(out / "mosaic.zarr")["classes"].values, maps["first_new"])
    failed = {
        s["path"]: s["error"]
        for s in json.loads((out / "manifest.json").read_text())["scenes"]
        if s["status"] == "failed"
    }
    assert failed[str(tmp_path / "array.json")] == "not a STAC Item or ItemCollection"
    assert "not found" in failed[str(tmp_path / "missing.json")]
    assert failed[f"{tmp_path / 'visual.json'}#x"] == "item 'x' has no asset 'image' (has: visual)"
    a = open_scene(old)
    assert order_scenes([a], "latest") == [a]


def test_scene_on_another_crs_is_warped_onto_the_grid(tmp_path, random_checkpoint, client2):
    a = write_scene(SceneSpec(400, 300, seed=1, nodata_border=False), tmp_path / "a.tif")[0]
    b = write_scene(
        SceneSpec(300, 300, seed=2, crs="EPSG:3857", origin=(1_675_000.0, 5_931_000.0), nodata_border=False),
        tmp_path / "b.tif",
    )[0]
    result = run(run_config(random_checkpoint, [a, b], tmp_path / "out"), client2)
    assert result.ok
    ds = xr.open_zarr(tmp_path / "out" / "mosaic.zarr")
    assert ds.rio.crs.to_epsg() == 32633  # the first scene's grid
    classes = ds["classes"].values
    assert classes.shape[1] > 400  # extended to cover the second scene
    # the warped scene's pixels are segmented, beyond the first scene's footprint
    assert (classes[:, 400:] != 255).sum() > 10_000


def test_rerun_reuses_finished_blocks_and_refuses_a_changed_config(
    tmp_path, random_checkpoint, scene_1000x700, client2
):
    cfg = run_config(random_checkpoint, [scene_1000x700[0]], tmp_path, "output.block_size=512", "output.polygons=false")
    run(cfg, client2)
    first = xr.open_zarr(tmp_path / "mosaic.zarr")["classes"].values
    # lose two blocks' markers, as if the run had been killed before them, and their pixels with
    # them (a rerun that skipped them would leave this)
    from geoseg import mosaic
    from geoseg.tiling import iter_blocks

    for block in iter_blocks(700, 1000, 512):
        if block.key in ("0_1", "1_0"):
            (tmp_path / ".geoseg" / "blocks" / f"{block.key}.json").unlink()
            rows, cols = block.rows.size, block.cols.size
            garbage = (np.full((rows, cols), 3, np.uint8), np.zeros((rows, cols), np.uint8))
            mosaic.write_block(tmp_path / "mosaic.zarr", block, *garbage)
    assert not np.array_equal(xr.open_zarr(tmp_path / "mosaic.zarr")["classes"].values, first)
    run(cfg, client2)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["summary"]["computed"] == 2 and manifest["summary"]["reused"] == 2
    np.testing.assert_array_equal(xr.open_zarr(tmp_path / "mosaic.zarr")["classes"].values, first)
    changed = run_config(random_checkpoint, [scene_1000x700[0]], tmp_path, "output.block_size=256")
    with pytest.raises(RunError, match="--overwrite"):
        run(changed, client2)
    shutil.rmtree(tmp_path / ".geoseg")


def test_inputs_from_a_stac_item_collection_and_a_directory(
    tmp_path, random_checkpoint, scene_1000x700, client2, monkeypatch
):
    from geoseg.catalog import expand_inputs

    d = tmp_path / "scenes"
    a = write_scene(SceneSpec(64, 64, seed=1), d / "a.tif")[0]
    b = write_scene(SceneSpec(64, 64, seed=2), d / "b.tif")[0]
    (d / "readme.txt").write_text("not a scene")
    items = item_collection(("b", None, "scenes/b.tif"), ("a", None, str(a)))
    (tmp_path / "items.json").write_text(items)
    assert expand_inputs([str(tmp_path / "items.json")]) == [str(b), str(a)]
    assert expand_inputs([str(d)]) == [str(a), str(b)]
    assert expand_inputs([str(d / "*.tif")]) == [str(a), str(b)]
    with pytest.raises(RunError, match="has no asset 'visual'"):
        expand_inputs([str(tmp_path / "items.json")], "visual")
    # the folder (relative to where geoseg runs) and the collection name the same scenes: once
    # each, by the name first met, with the item that named it and the date of the one dated
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dated.json").write_text(item_collection(("a-dated", "2024-06-12T10:06:29Z", "scenes/a.tif")))
    origins: dict = {}
    found = expand_inputs(["scenes", "items.json", "dated.json"], origins=origins)
    assert found == [str(Path("scenes") / "a.tif"), str(Path("scenes") / "b.tif")]
    assert (origins[found[0]].item_id, origins[found[0]].acquired) == ("a-dated", "2024-06-12T10:06:29Z")
    assert (origins[found[1]].item_id, origins[found[1]].acquired) == ("b", None)


def test_a_stac_assets_bad_file_is_named_with_its_item_and_a_good_one_takes_the_items_date(tmp_path):
    from geoseg.catalog import catalog, expand_inputs

    good = write_scene(SceneSpec(64, 64, seed=1), tmp_path / "good.tif")[0]
    items = item_collection(
        ("S2B_33UVP_20240612", "2024-06-12T10:06:29Z", "good.tif"), ("S2A_33UVP_20240601", None, "gone.tif")
    )
    (tmp_path / "items.json").write_text(items)
    origins = {}
    scenes, failed = catalog(expand_inputs([str(tmp_path / "items.json")], origins=origins), 4, origins=origins)
    assert [(s.path, s.acquired) for s in scenes] == [(str(good), "2024-06-12T10:06:29Z")]
    origin = f"item 'S2A_33UVP_20240601' of {tmp_path / 'items.json'}"
    assert failed == {str(tmp_path / "gone.tif"): f"file not found (the asset of {origin})"}


@pytest.mark.parametrize("readers", [1, 3])
def test_corrupt_tile_inside_a_scene_fails_its_blocks_only(tmp_path, random_checkpoint, client2, readers, caplog):
    """The header and the last block read fine, but one internal tile is garbage: the blocks
    that need it fail with the file's name, the others are written, and the run says so
    (also when the failing read is one of several in flight in the reader threads), each
    failure once, as it happens."""
    caplog.set_level(logging.INFO)
    scene = write_scene(SceneSpec(1536, 1536, seed=5, nodata_border=False), tmp_path / "scene.tif")[0]
    with rasterio.open(scene) as src:
        assert src.block_shapes[0] == (256, 256)
        offset = int(src.get_tag_item("BLOCK_OFFSET_0_0", "TIFF", bidx=1))  # rows/cols 0..255
    data = bytearray(scene.read_bytes())
    data[offset : offset + 64] = b"\xff" * 64  # breaks the deflate stream of that tile
    scene.write_bytes(bytes(data))
    out = tmp_path / "out"
    overrides = ["output.block_size=512", f"cluster.read_threads={readers}", "output.polygons=false"]
    result = run(run_config(random_checkpoint, [scene], out, *overrides), client2)
    assert not result.ok
    manifest = json.loads(Path(result.manifest).read_text())
    failed = {k: v["error"] for k, v in manifest["blocks"].items() if v["status"] != "done"}
    # block 0_0 owns the tiles over the broken one; the blocks its tiles reach fail with it
    assert set(failed) == {"0_0", "0_1", "1_0", "1_1"}
    assert "scene.tif: cannot read pixels" in failed["0_0"]
    assert all("scene.tif" in err for err in failed.values())
    assert any("block 0_0" in err for k, err in failed.items() if k != "0_0")
    lines = caplog.text.splitlines()
    last_progress = max(i for i, line in enumerate(lines) if "segmenting blocks: " in line)
    for key in failed:  # logged once, while the other blocks are still being computed
        said = [i for i, line in enumerate(lines) if f"block {key} failed: " in line]
        assert len(said) == 1 and said[0] < last_progress, (key, said, last_progress)
    done = [k for k, v in manifest["blocks"].items() if v["status"] == "done"]
    classes = xr.open_zarr(out / "mosaic.zarr")["classes"].values
    for key in done:  # the finished blocks are in the mosaic
        r, c = map(int, key.split("_"))
        assert (classes[r * 512 : (r + 1) * 512, c * 512 : (c + 1) * 512] != 255).all()


def test_a_scene_whose_every_block_failed_is_not_called_unused(tmp_path):
    """ "unused" says earlier scenes covered it; blocks that failed to read it say nothing of that."""
    from geoseg.segmentation import empty_scenes

    scene = open_scene(write_scene(SceneSpec(64, 64, seed=1), tmp_path / "s.tif")[0])
    failed = {"0_0": {"status": "failed", "error": "RasterioIOError: s.tif: cannot read pixels"}}
    assert empty_scenes([scene], failed) == {}
    assert empty_scenes([scene], {"0_0": {"status": "done", "scene_valid_pixels": {}}}) == {str(scene.path): None}


def write_rotated(path, scene, degrees: float = 20.0):
    """300 x 250 px of ``scene`` under a geotransform rotated by ``degrees``."""
    from rasterio.transform import Affine

    with rasterio.open(scene) as src:
        data, profile = src.read(window=rasterio.windows.Window(100, 100, 300, 250)), src.profile
    profile.update(width=300, height=250, transform=from_origin(503_000, 5_199_000, 10, 10) * Affine.rotation(degrees))
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


@pytest.mark.parametrize("first", [True, False])
def test_a_rotated_geotransform_is_warped_wherever_it_stands_in_the_list(
    tmp_path, random_checkpoint, scene_1000x700, client2, first
):
    rotated = write_rotated(tmp_path / "rotated.tif", scene_1000x700[0])
    good = write_scene(SceneSpec(200, 200, seed=6, nodata_border=False), tmp_path / "good.tif")[0]
    inputs = [rotated, good] if first else [good, rotated]
    result = run(run_config(random_checkpoint, inputs, tmp_path / "out"), client2)
    assert result.ok, (result.failed_scenes, result.failed_blocks)
    ds = xr.open_zarr(tmp_path / "out" / "mosaic.zarr")
    t = ds.rio.transform()
    assert (t.b, t.d) == (0.0, 0.0) and (t.a, -t.e) == pytest.approx((10.0, 10.0))
    # the rotated footprint is segmented: about its 300 x 250 pixels are classes on the north-up grid
    with rasterio.open(rotated) as src:
        corners = [src.transform * c for c in [(0, 0), (300, 0), (0, 250), (300, 250)]]
    west, north = min(x for x, _ in corners), max(y for _, y in corners)
    east, south = max(x for x, _ in corners), min(y for _, y in corners)
    window = ds["classes"].rio.clip_box(west, south, east, north).values
    assert 0.9 * 300 * 250 < (window != 255).sum() < 1.1 * 300 * 250 + 200 * 200


def write_patch_scene(path, scene, size: int, patch: tuple[int, int, int], sparse: bool) -> None:
    """A ``size`` px square scene, nodata (0) but for a ``patch`` (row, col, side) of ``scene``'s pixels.
    Sparse: only the file blocks over the patch are stored; dense: every block is."""
    row, col, side = patch
    with rasterio.open(scene) as src:
        data, crs = src.read(window=rasterio.windows.Window(src.width - side, src.height - side, side, side)), src.crs
    profile = dict(
        driver="GTiff", width=size, height=size, count=4, dtype="uint16", nodata=0, crs=crs, tiled=True,
        blockxsize=256, blockysize=256, transform=from_origin(500_000, 5_200_000, 10, 10), sparse_ok=sparse,
    )  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        if not sparse:
            dst.write(np.zeros((4, size, size), np.uint16))
        dst.write(data, window=rasterio.windows.Window(col, row, side, side))


def test_blocks_without_data_cost_no_pass_and_leave_no_votes(tmp_path, random_checkpoint, scene_1000x700, client2):
    """A sparse file's absent blocks are left out before any task; all-nodata blocks of a dense
    file compute no tile and save no votes. Both give the mosaic of the same pixels."""
    from geoseg.blocks import partials_root, predict_task
    from geoseg.planning import plan_run

    patch = (1100, 700, 300)
    outs = {}
    for sparse in (True, False):
        scene = tmp_path / f"{'sparse' if sparse else 'dense'}.tif"
        write_patch_scene(scene, scene_1000x700[0], 2048, patch, sparse)
        outs[sparse] = tmp_path / f"out_{sparse}"
        cfg = run_config(random_checkpoint, [scene], outs[sparse], "output.block_size=256")
        assert run(cfg, client2).ok
    sparse_file, dense_file = tmp_path / "sparse.tif", tmp_path / "dense.tif"
    assert sparse_file.stat().st_size < dense_file.stat().st_size / 2
    classes = {k: xr.open_zarr(v / "mosaic.zarr")["classes"].values for k, v in outs.items()}
    np.testing.assert_array_equal(classes[True], classes[False])
    with rasterio.open(sparse_file) as src:
        assert (classes[True] != 255).sum() == (src.read_masks(1) > 0).sum() > 0.5 * 300 * 300
    manifests = {k: json.loads((v / "manifest.json").read_text()) for k, v in outs.items()}
    assert manifests[True]["summary"]["tiles"] == manifests[False]["summary"]["tiles"] <= 4 * 4
    # the patch is stored in 2 x 2 file blocks (rows 1024-1536, cols 512-1024): with a tile's
    # margin they reach 4 x 4 blocks of 256 px; the sparse run computed only those
    assert manifests[True]["summary"]["without_data"] == 64 - 16
    assert manifests[False]["summary"]["without_data"] == 0
    # chunks are stored only where there are classes; the rest reads as the fill value
    stored = list((outs[False] / "mosaic.zarr" / "classes" / "c").rglob("*"))
    assert 1 <= len([p for p in stored if p.is_file()]) <= 4
    # a block of the dense file with no valid pixel computes no tile and stores no votes
    cfg = run_config(random_checkpoint, [dense_file], tmp_path / "probe", "output.block_size=256")
    plan = plan_run(cfg)
    far = plan.blocks[0]
    layers = {"all": plan.scenes}
    settings = InferenceSettings(str(random_checkpoint), 8, "cpu", False, 1, False)
    at = partials_root(str(tmp_path / "probe"), plan.fingerprint)
    record = predict_task(far, layers, plan.grid, plan.tiling, settings, at)
    assert record["status"] == "done" and record["tiles"] == 0
    folder = Path(at) / far.key
    assert [p.name for p in folder.iterdir()] == ["record.json"]
    assert plan.footprints[0].coverage is None  # dense: every file block is there
    assert plan_run(run_config(random_checkpoint, [sparse_file], tmp_path / "p2")).footprints[0].coverage is not None


def test_a_sparse_file_with_no_data_block_is_a_named_error_and_a_mask_band_keeps_every_block(
    tmp_path, random_checkpoint
):
    from geoseg.scenes import data_coverage

    profile = dict(
        driver="GTiff", width=1024, height=1024, count=4, dtype="uint16", nodata=0, crs="EPSG:32633", tiled=True,
        blockxsize=256, blockysize=256, transform=from_origin(500_000, 5_200_000, 10, 10), sparse_ok=True,
    )  # fmt: skip
    nothing = tmp_path / "nothing.tif"
    with rasterio.open(nothing, "w", **profile):
        pass
    with pytest.raises(RunError, match=r"nothing.tif: all pixels are nodata \(the file stores no data block\)"):
        run(run_config(random_checkpoint, [nothing], tmp_path / "out"))
    # with a mask band, validity comes from the mask: absent blocks are not known to be invalid
    masked = tmp_path / "masked.tif"
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(masked, "w", **profile) as dst:
        dst.write(np.full((4, 256, 256), 7, np.uint16), window=rasterio.windows.Window(0, 0, 256, 256))
        dst.write_mask(np.full((1024, 1024), 255, np.uint8))
    assert data_coverage(nothing) is not None and data_coverage(masked) is None


@pytest.mark.parametrize(
    "line, shown",
    [
        (  # an Azure SAS: colons inside the query, the ": " of the error line after it
            "https://acct.blob.core.windows.net/c/a.tif?se=2030-01-01T00:00:00Z&sig=SECRET: no such object",
            "https://acct.blob.core.windows.net/c/a.tif?***: no such object",
        ),
        ("'https://h/a.tif?X-Amz-Signature=SECRET&X-Amz-Credential=c' is bad", "'https://h/a.tif?***' is bad"),
        ("/tmp/copy/a.tif?sv=1&sig=SECRET: cannot read", "/tmp/copy/a.tif?sv=1&sig=***: cannot read"),
        ("s3://user:SECRET@bucket/a.tif: access denied", "s3://***@bucket/a.tif: access denied"),
        (  # GDAL's name for a URL it reads by GETs, the URL percent-encoded in it
            "/vsicurl?use_head=no&url=https%3A%2F%2Fh%2Fa.tif%3FX-Goog-Signature%3DSECRET%26X-Goog-Date%3D1: 403",
            "/vsicurl?use_head=no&url=https://h/a.tif?***: 403",
        ),
    ],
)
def test_a_secret_in_an_error_line_is_redacted_and_the_rest_of_the_line_kept(line, shown):
    from geoseg.storage import redact

    assert redact(line) == shown


def test_a_url_signed_again_names_the_same_object_and_two_objects_stay_two():
    """What a run's fingerprint and records know a scene by: without the signing parameters that
    change each time a URL is signed, with what tells objects apart (a version, an item)."""
    from geoseg.storage import record_name, unsigned

    signed = "https://h/b/a.tif?versionId=3&X-Amz-Signature={}&X-Amz-Date=20261130T101010Z"
    assert unsigned(signed.format("one")) == unsigned(signed.format("two")) == "https://h/b/a.tif?versionId=3"
    assert unsigned(signed.format("one")) != unsigned(signed.replace("versionId=3", "versionId=4").format("one"))
    sas = "https://acct.blob.core.windows.net/c/items.json?sv=2024&se=2030&sig={}#{}"
    assert unsigned(sas.format("s1", "june")) == "https://acct.blob.core.windows.net/c/items.json#june"
    assert record_name(sas.format("s1", "june")) == record_name(sas.format("s2", "june"))
    assert record_name(sas.format("s1", "june")) != record_name(sas.format("s1", "may"))
    assert "s1" not in record_name(sas.format("s1", "june")) and record_name("/data/a.tif") == "/data/a.tif"
    # credentials under other names, and in the host part, are no part of the object either
    keyed = "https://user:pw@tiles.example.org/a.tif?api_key={}&access_token=t&generation=7"
    assert (
        unsigned(keyed.format("k1")) == unsigned(keyed.format("k2")) == "https://tiles.example.org/a.tif?generation=7"
    )


@pytest.mark.parametrize(
    "message, said",
    [
        ("HTTP response code: 404", "no such object"),
        ("HTTP response code: 403", "access denied"),
        ("/vsis3/b/gone.tif: The specified key does not exist.", "no such object"),
        ("'/vsiaz/c/gone.tif': The specified blob does not exist.", "no such object"),
        ("/vsis3/nobucket/a.tif: The specified bucket does not exist", "no such bucket"),
        ("/vsis3/b/a.tif: Access Denied", "access denied"),
        ("not recognized as being in a supported file format", None),
    ],
)
def test_what_gdals_messages_say_of_a_remote_object(message, said):
    """GDAL passes a store's error on as a status or as the store's own text: both are named."""
    from geoseg.storage import gdal_reason, http_reason

    assert http_reason(message) == said
    noisy = "HTTP response code: 404 - Failure writing output to destination, passed 318 returned 0"
    assert gdal_reason(noisy) == "HTTP response code: 404"
