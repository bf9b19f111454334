"""End to end on a real LocalCluster: partition invariance, georeference, nodata, outputs."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
from conftest import make_random_checkpoint, predict_transitions, run_config
from rasterio.crs import CRS
from rasterio.transform import Affine

from geoseg import mosaic
from geoseg.blocks import partials_root, predict_task, work_order
from geoseg.grid import OutputGrid, grid_from_scenes
from geoseg.inference import InferenceSettings, Predictor
from geoseg.jobs import run
from geoseg.models.checkpoint import load_checkpoint
from geoseg.scenes import open_scene
from geoseg.segment import TilingSettings, predict_block
from geoseg.synth import SceneSpec, write_scene
from geoseg.tiling import iter_blocks


def read_classes(out):
    return xr.open_zarr(out / "mosaic.zarr")["classes"].values


@pytest.fixture(scope="module")
def reference(tmp_path_factory, random_checkpoint, scene_1000x700, client2):
    """The mosaic with the whole scene as one block: what every other partition must equal."""
    out = tmp_path_factory.mktemp("ref")
    layers = ("vector.formats=[gpkg, parquet, fgb]", "vector.reproject_to=EPSG:4326")
    cfg = run_config(random_checkpoint, [scene_1000x700[0]], out, "output.block_size=1024", *layers)
    result = run(cfg, client2)
    assert result.ok
    return out


@pytest.mark.parametrize("block_size", [256, 512])
def test_class_map_does_not_depend_on_block_size(
    tmp_path, random_checkpoint, scene_1000x700, client2, reference, block_size
):
    cfg = run_config(
        random_checkpoint, [scene_1000x700[0]], tmp_path, f"output.block_size={block_size}", "output.polygons=false"
    )
    since = time.time()
    run(cfg, client2)
    got, want = read_classes(tmp_path), read_classes(reference)
    # Bitwise: the same tiles' fixed-point votes, summed exactly (no tolerance needed on CPU).
    np.testing.assert_array_equal(got, want)
    confidence = [xr.open_zarr(out / "mosaic.zarr")["confidence"].values for out in (tmp_path, reference)]
    np.testing.assert_array_equal(*confidence)
    # and the random model does produce several classes, so the comparison means something
    assert len(np.unique(want[want != 255])) >= 2
    # No tile is computed twice: the many small blocks run as many forward passes as one block,
    # and no more than the tile grid has (nodata-only tiles are skipped).
    tiles = json.loads((tmp_path / "manifest.json").read_text())["summary"]["tiles"]
    assert tiles == json.loads((reference / "manifest.json").read_text())["summary"]["tiles"]
    assert 0.9 * 9 * 7 <= tiles <= 9 * 7  # 1000 x 700 px with tile 128 and stride 112
    # the neighbours' partial results are deleted once read
    assert not (tmp_path / ".geoseg" / "partials").exists()
    # Dask's queue hands step 1 out in work order, one block per worker thread: never more
    # blocks on the workers than they have threads, so no block waits behind another on a busy
    # worker. The first free threads' worth is placed before the queue forms; a group of at most
    # twice the threads is not queued at all (Dask places such few tasks at once).
    handed_out, most_at_once = predict_schedule(client2, since)
    grid = mosaic.read_grid(tmp_path / "mosaic.zarr")
    blocks = list(iter_blocks(grid.height, grid.width, block_size))
    expected = [b.key for b in work_order(blocks, grid, TilingSettings(128, 16, "gaussian", block_size))]
    first = handed_out[:2]
    assert set(first) <= set(expected[:5])
    assert handed_out[2:] == [k for k in expected if k not in first]
    if len(blocks) > 2 * 2:
        assert most_at_once == 2


def predict_schedule(client, since: float) -> tuple[list[str], int]:
    """Blocks in the order the scheduler put their step 1 on a worker, and the most on workers at once."""
    handed_out, running, most = [], 0, 0
    for key, start, finish in predict_transitions(client, since):
        if finish == "processing":
            handed_out.append(key.rsplit("-", 1)[1])
            running += 1
        elif start == "processing":
            running -= 1
        most = max(most, running)
    return handed_out, most


def test_work_order_goes_row_by_row_biggest_block_first():
    grid = OutputGrid(CRS.from_epsg(32633).to_wkt(), (10.0, 0.0, 0.0, 0.0, -10.0, 0.0), 1000, 700)
    tiling = TilingSettings(128, 16, "gaussian", 256)
    blocks = list(iter_blocks(700, 1000, 256))
    ordered = work_order(blocks, grid, tiling)
    assert [b.row for b in ordered] == sorted(b.row for b in blocks)
    owned = [len(r.owned) * len(c.owned) for r, c in (tiling.ownership(b, grid) for b in ordered)]
    for row in {b.row for b in blocks}:
        in_row = [n for n, b in zip(owned, ordered, strict=True) if b.row == row]
        assert in_row == sorted(in_row, reverse=True) and len(set(in_row)) > 1


def test_class_map_does_not_depend_on_worker_count(tmp_path, random_checkpoint, scene_1000x700, client1, reference):
    cfg = run_config(random_checkpoint, [scene_1000x700[0]], tmp_path, "output.block_size=256", "output.polygons=false")
    run(cfg, client1)
    np.testing.assert_array_equal(read_classes(tmp_path), read_classes(reference))
    conf_a = xr.open_zarr(tmp_path / "mosaic.zarr")["confidence"].values
    conf_b = xr.open_zarr(reference / "mosaic.zarr")["confidence"].values
    np.testing.assert_array_equal(conf_a, conf_b)


@pytest.mark.parametrize(("layout", "threads"), [({}, 3), ({"tiled": False, "blockysize": 7}, 2)])
def test_class_map_does_not_depend_on_reader_threads_or_file_layout(
    tmp_path, random_checkpoint, scene_1000x700, client2, reference, layout, threads
):
    """Several threads read each block's rows in bands of the file's blocks (256 px tiles, or
    strips of 7 rows) at once: the same pixels as one thread reading a tile row at a time."""
    scene = scene_1000x700[0]
    if layout:  # the same pixels and georeference, stored in strips
        scene = tmp_path / "striped.tif"
        with rasterio.open(scene_1000x700[0]) as src:
            profile = {**src.profile, **layout}
            profile.pop("blockxsize", None)
            with rasterio.open(scene, "w", **profile) as dst:
                dst.write(src.read())
        assert open_scene(scene).block_rows == 7
    out = tmp_path / "out"
    cfg = run_config(
        random_checkpoint,
        [scene],
        out,
        "output.block_size=256",
        f"cluster.read_threads={threads}",
        "output.polygons=false",
    )
    assert run(cfg, client2).ok
    got, want = xr.open_zarr(out / "mosaic.zarr"), xr.open_zarr(reference / "mosaic.zarr")
    np.testing.assert_array_equal(got["classes"].values, want["classes"].values)
    np.testing.assert_array_equal(got["confidence"].values, want["confidence"].values)


@pytest.mark.parametrize("blend", ["cosine", "trim"])
def test_other_blend_modes_are_partition_invariant_too(tmp_path, random_checkpoint, scene_1000x700, client2, blend):
    maps = []
    for bs in (256, 1024):
        out = tmp_path / f"b{bs}"
        run(
            run_config(
                random_checkpoint,
                [scene_1000x700[0]],
                out,
                f"output.block_size={bs}",
                f"tiling.blend={blend}",
                "output.polygons=false",
            ),
            client2,
        )
        maps.append(read_classes(out))
    np.testing.assert_array_equal(maps[0], maps[1])


def test_georeference_matches_the_input(reference, scene_1000x700):
    ds = xr.open_zarr(reference / "mosaic.zarr")
    with rasterio.open(scene_1000x700[0]) as src:
        assert ds["classes"].shape == (src.height, src.width) == (700, 1000)
        assert ds.rio.crs == src.crs
        assert ds.rio.transform() == src.transform
        assert ds.rio.bounds() == pytest.approx(tuple(src.bounds))
        # pixel-centre coordinates
        assert float(ds.x[0]) == pytest.approx(src.transform.c + 5)
        assert float(ds.y[-1]) == pytest.approx(src.bounds.bottom + 5)
    assert ds["classes"].dtype == np.uint8 and ds["confidence"].dtype == np.uint8
    assert ds["classes"].rio.crs.to_epsg() == 32633


def test_a_zarr_v2_mosaic_opens_in_gdal_with_the_inputs_georeference(
    tmp_path, random_checkpoint, scene_1000x700, client2, reference
):
    cfg = run_config(random_checkpoint, [scene_1000x700[0]], tmp_path, "output.block_size=512", "output.zarr_format=2")
    assert run(cfg, client2).ok
    store = tmp_path / "mosaic.zarr"
    assert (store / "classes" / ".zarray").exists() and not (store / "zarr.json").exists()
    with rasterio.open(scene_1000x700[0]) as src, rasterio.open(f'ZARR:"{store}":/classes') as zarr_v2:
        assert zarr_v2.crs == src.crs
        assert zarr_v2.transform == src.transform
        assert zarr_v2.nodata == 255
        np.testing.assert_array_equal(zarr_v2.read(1), read_classes(reference))  # bitwise the v3 mosaic
    ds = xr.open_zarr(store)  # and xarray/rioxarray as before
    assert ds.rio.crs.to_epsg() == 32633 and ds["confidence"].dims == ("y", "x")
    with rasterio.open(scene_1000x700[0]) as src, rasterio.open(f'ZARR:"{store}":/overviews/2/classes') as level:
        assert level.crs == src.crs and level.transform == src.transform * Affine.scale(2)
        assert level.shape == (350, 500)
    again = run(cfg, client2)  # the same command again: every block reused from the v2 store
    summary = json.loads(Path(again.manifest).read_text())["summary"]
    assert summary["reused"] == summary["blocks"] and summary["computed"] == 0


def test_geozarr_attributes_and_overviews_written_with_the_blocks(
    tmp_path, random_checkpoint, scene_1000x700, client2, reference
):
    import zarr

    from geoseg.overviews import downsample

    cfg = run_config(random_checkpoint, [scene_1000x700[0]], tmp_path, "output.block_size=256")
    assert run(cfg, client2).ok
    root = zarr.open_group(str(tmp_path / "mosaic.zarr"), mode="r")
    with rasterio.open(scene_1000x700[0]) as src:
        assert root.attrs["proj:code"] == "EPSG:32633"
        assert root.attrs["spatial:transform"] == list(src.transform)[:6]
        assert root.attrs["spatial:shape"] == [700, 1000]
        assert root.attrs["spatial:bbox"] == pytest.approx(list(src.bounds))
    assert {c["name"] for c in root.attrs["zarr_conventions"]} == {"spatial", "proj", "multiscales"}
    import warnings

    with warnings.catch_warnings():  # a level is georeferenced too, and has its metadata in one document
        warnings.simplefilter("error")
        level = xr.open_zarr(tmp_path / "mosaic.zarr" / "overviews" / "4")  # as a store of its own
    with rasterio.open(scene_1000x700[0]) as src:
        assert level.rio.crs == src.crs and level.rio.transform() == src.transform * Affine.scale(4)
    layout = root.attrs["multiscales"]["layout"]
    assert [entry["asset"] for entry in layout] == ["classes", "overviews/2/classes", "overviews/4/classes"]
    ref = zarr.open_group(str(reference / "mosaic.zarr"), mode="r")
    whole = ref["classes"][:], ref["confidence"][:]
    for entry in layout[1:]:
        factor = int(entry["transform"]["scale"][0])
        level_classes, level_confidence = downsample(*whole, factor)  # of the whole mosaic, in one piece
        np.testing.assert_array_equal(root[entry["asset"]][:], level_classes)
        np.testing.assert_array_equal(root[f"overviews/{factor}/confidence"][:], level_confidence)
        assert entry["spatial:shape"] == list(level_classes.shape)
        assert entry["spatial:transform"][0] == 10.0 * factor
    assert (root["overviews/4/classes"][:] != 255).mean() > 0.5  # written, not left at the fill value


def test_nodata_stays_nodata(reference, scene_1000x700):
    classes = read_classes(reference)
    with rasterio.open(scene_1000x700[0]) as src:
        valid = src.read_masks(1) > 0
    assert (~valid).sum() > 1000  # the scene has a real nodata wedge
    np.testing.assert_array_equal(classes == 255, ~valid)
    confidence = xr.open_zarr(reference / "mosaic.zarr")["confidence"].values
    assert (confidence[valid] > 0).all() and (confidence <= 100).all()


def test_polygons_match_the_mosaic(reference):
    gdf = gpd.read_file(reference / "polygons.gpkg")
    classes = read_classes(reference)
    assert list(gdf.columns) == ["class_id", "class_name", "area_m2", "mean_confidence", "geometry"]
    assert gdf.crs.to_epsg() == 32633
    assert gdf.geometry.is_valid.all()
    counts = np.bincount(classes[classes != 255], minlength=7)
    per_class = gdf.groupby("class_id")["area_m2"].sum()
    for k, n in enumerate(counts):
        assert per_class.get(k, 0.0) == pytest.approx(n * 100.0)  # 10 m pixels
    np.testing.assert_allclose(gdf["area_m2"], gdf.geometry.area)


def test_a_run_writes_its_polygons_in_every_format_asked_and_in_the_other_crs(reference):
    gpkg = gpd.read_file(reference / "polygons.gpkg")
    for copy in (gpd.read_parquet(reference / "polygons.parquet"), gpd.read_file(reference / "polygons.fgb")):
        assert copy.crs == gpkg.crs and len(copy) == len(gpkg) and list(copy.columns) == list(gpkg.columns)
        assert copy["area_m2"].sum() == pytest.approx(gpkg["area_m2"].sum())
    for suffix in ("gpkg", "parquet", "fgb"):
        wgs84 = gpd.read_parquet if suffix == "parquet" else gpd.read_file
        other = wgs84(reference / f"polygons_epsg4326.{suffix}")
        assert other.crs.to_epsg() == 4326 and len(other) == len(gpkg)
        assert other.to_crs(gpkg.crs).area.sum() == pytest.approx(gpkg.area.sum(), rel=1e-6)
    outputs = json.loads((reference / "manifest.json").read_text())["outputs"]
    assert outputs["polygons_parquet"] == str(reference / "polygons.parquet")
    assert outputs["polygons_fgb_epsg4326"] == str(reference / "polygons_epsg4326.fgb")


def test_a_rerun_asking_fewer_layers_removes_the_others_in_its_own_folder_only(
    tmp_path, reference, random_checkpoint, scene_1000x700, client2
):
    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    result = run(run_config(random_checkpoint, [scene_1000x700[0]], copy, "output.block_size=1024"), client2)
    assert result.ok and json.loads(Path(result.manifest).read_text())["summary"]["reused"] == 1
    assert sorted(p.name for p in copy.glob("polygons*")) == ["polygons.gpkg"]  # the rest held old polygons
    outputs = json.loads((copy / "manifest.json").read_text())["outputs"]
    assert {k: v for k, v in outputs.items() if k.startswith("polygons")} == {"polygons": str(copy / "polygons.gpkg")}
    assert (reference / "polygons.parquet").exists() and (reference / "polygons_epsg4326.fgb").exists()


def test_manifest_records_the_run(reference, scene_1000x700, random_checkpoint):
    manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["scenes"] == [{"path": str(scene_1000x700[0]), "status": "ok", "acquired": None}]
    assert manifest["summary"]["blocks"] == 1 and manifest["summary"]["failed_blocks"] == 0
    assert manifest["model"]["arch"] == "unet" and len(manifest["model"]["sha256"]) == 64
    assert all(b["status"] == "done" for b in manifest["blocks"].values())
    hist = sum(np.array([int(v) for v in b["histogram"].values()]).sum() for b in manifest["blocks"].values())
    assert hist == 700 * 1000
    blocks = list(manifest["blocks"].values())
    assert all(0 < b["forward_s"] < b["seconds"] for b in blocks)  # the passes, within the block's time
    assert manifest["timings"]["forward_s"] == pytest.approx(sum(b["forward_s"] for b in blocks), abs=1e-3)
    assert 0 < manifest["timings"]["model_share"] < 1


@pytest.fixture(scope="module")
def overlapping_scenes(tmp_path_factory):
    d = tmp_path_factory.mktemp("multi")
    a = write_scene(SceneSpec(600, 400, seed=11, nodata_border=False), d / "a.tif")[0]
    b = write_scene(SceneSpec(500, 450, seed=12, origin=(503_360.0, 5_198_880.0)), d / "b.tif")[0]
    return a, b


@pytest.mark.parametrize("rule", ["first", "confidence"])
def test_multi_scene_mosaic_is_partition_invariant(tmp_path, random_checkpoint, overlapping_scenes, client2, rule):
    maps = []
    for bs, readers in ((128, 1), (1024, 2)):  # and whatever the number of reader threads
        out = tmp_path / f"b{bs}"
        cfg = run_config(
            random_checkpoint,
            list(overlapping_scenes),
            out,
            f"output.block_size={bs}",
            f"output.mosaic_rule={rule}",
            f"cluster.read_threads={readers}",
            "output.polygons=false",
        )
        assert run(cfg, client2).ok
        maps.append(read_classes(out))
    assert maps[0].shape == (562, 836)  # the union of both footprints
    np.testing.assert_array_equal(maps[0], maps[1])


def test_confidence_rule_keeps_the_most_confident_scene(tmp_path, random_checkpoint, overlapping_scenes, client2):
    def mosaic(name, inputs, rule="first"):
        out = tmp_path / name
        run(run_config(random_checkpoint, inputs, out, f"output.mosaic_rule={rule}", "output.polygons=false"), client2)
        ds = xr.open_zarr(out / "mosaic.zarr")
        return ds["classes"].values, ds["confidence"].values

    def placed(arrays, row, col):  # a single-scene mosaic put on the two-scene grid
        cls, conf = np.full((562, 836), 255, np.uint8), np.zeros((562, 836), np.uint8)
        h, w = arrays[0].shape
        cls[row : row + h, col : col + w], conf[row : row + h, col : col + w] = arrays
        return cls, conf

    a, b = overlapping_scenes
    both_cls, both_conf = mosaic("both", [a, b], "confidence")
    a_cls, a_conf = placed(mosaic("a", [a]), 0, 0)
    # b starts 336 px east and 112 px south of a: whole tile strides, so both share one tile grid
    b_cls, b_conf = placed(mosaic("b", [b]), 112, 336)
    pick_b = (b_cls != 255) & ((a_cls == 255) | (b_conf > a_conf))
    # On the two-scene grid, tiles that start above and left of b also see b's first
    # overlap/2 rows and columns (b's own grid has no such tiles): compare beyond them.
    beyond = np.ones(both_cls.shape, bool)
    beyond[112 : 112 + 8, 336:] = beyond[112:, 336 : 336 + 8] = False
    np.testing.assert_array_equal(both_conf[beyond], np.where(pick_b, b_conf, a_conf)[beyond])
    np.testing.assert_array_equal(both_cls[beyond], np.where(pick_b, b_cls, a_cls)[beyond])
    # where the two scenes overlap, each wins somewhere
    overlap = (a_cls != 255) & (b_cls != 255)
    assert overlap.sum() > 10_000 and (pick_b & overlap).any() and (~pick_b & overlap).any()


def test_rerun_reuses_saved_partial_results(tmp_path, random_checkpoint, scene_1000x700, client2, reference):
    """A run killed between the two steps finds its step-1 results on disk and does not redo them;
    those another run saved there (the step 1 of a killed run with another model, still running
    on the workers after a rerun with --overwrite began) are never read."""
    cfg = run_config(random_checkpoint, [scene_1000x700[0]], tmp_path, "output.block_size=256", "output.polygons=false")
    assert run(cfg, client2).ok
    fingerprint = json.loads((tmp_path / "manifest.json").read_text())["fingerprint"]
    # As if the run had died after step 1 of blocks 1_1 and 0_1, the blocks unfinished: 1_1's
    # saved by this run, 0_1's by a run with another model and fingerprint.
    tiling = TilingSettings(128, 16, "gaussian", 256)
    grid = mosaic.read_grid(tmp_path / "mosaic.zarr")
    other = make_random_checkpoint(tmp_path.parent / "other.safetensors", seed=5)
    for key, checkpoint, run_fingerprint in (("1_1", random_checkpoint, fingerprint), ("0_1", other, "f" * 64)):
        (tmp_path / ".geoseg" / "blocks" / f"{key}.json").unlink()
        block = next(b for b in iter_blocks(700, 1000, 256) if b.key == key)
        settings = InferenceSettings(str(checkpoint), 8, "cpu", False, 1)
        at = partials_root(str(tmp_path), run_fingerprint)
        record = predict_task(block, {"all": [open_scene(scene_1000x700[0])]}, grid, tiling, settings, at)
        assert record["status"] == "done" and record["tiles"] > 0
        saved = Path(at) / key / "record.json"
        saved.write_text(json.dumps({**json.loads(saved.read_text()), "predict_s": 9999.0}))  # a mark to find
    result = run(cfg, client2)
    manifest = json.loads(Path(result.manifest).read_text())
    assert manifest["summary"]["computed"] == 2
    assert manifest["blocks"]["1_1"]["seconds"] >= 9999.0  # its step 1 was read back, not run again
    assert manifest["blocks"]["0_1"]["seconds"] < 9999.0  # the other run's was not read
    np.testing.assert_array_equal(read_classes(tmp_path), read_classes(reference))
    assert not (tmp_path / ".geoseg" / "partials").exists()


def test_a_saved_step_one_that_cannot_be_read_fails_its_blocks_not_the_run(
    tmp_path, random_checkpoint, scene_1000x700, client2, reference, caplog
):
    cfg = run_config(random_checkpoint, [scene_1000x700[0]], tmp_path, "output.block_size=256", "output.polygons=false")
    assert run(cfg, client2).ok
    fingerprint = json.loads((tmp_path / "manifest.json").read_text())["fingerprint"]
    (tmp_path / ".geoseg" / "blocks" / "1_1.json").unlink()
    unreadable = Path(partials_root(str(tmp_path), fingerprint)) / "1_1" / "record.json"
    unreadable.mkdir(parents=True)  # a read of it fails, as one denied or timing out on a store does
    result = run(cfg, client2)
    assert not result.ok and set(result.failed_blocks) == {"1_1"}
    assert str(unreadable) in result.failed_blocks["1_1"]
    assert json.loads(Path(result.manifest).read_text())["status"] == "incomplete"
    assert f"could not remove step-1 results {unreadable.parent}" in caplog.text  # litter, logged
    unreadable.rmdir()
    assert run(cfg, client2).ok  # the rerun computes the block
    np.testing.assert_array_equal(read_classes(tmp_path), read_classes(reference))
    # a record that reads but is damaged would fail the block on every rerun: computed again instead
    (tmp_path / ".geoseg" / "blocks" / "1_1.json").unlink()
    unreadable.parent.mkdir(parents=True)
    unreadable.write_text('{"status": "do')
    assert run(cfg, client2).ok  # (the worker logs that it computes the block again)
    np.testing.assert_array_equal(read_classes(tmp_path), read_classes(reference))


def test_votes_added_on_the_model_device_give_the_same_blocks(random_checkpoint, scene_1000x700):
    """A GPU adds a block's votes where it makes them (geoseg.device_blending); the same code on
    the CPU device gives each block's interior and frames bitwise as the host accumulator does,
    at the scene's corner, edges and nodata wedge alike."""
    scene = open_scene(scene_1000x700[0])
    grid = grid_from_scenes([scene])
    tiling = TilingSettings(128, 16, "gaussian", 256)
    predictor = Predictor(load_checkpoint(str(random_checkpoint)), InferenceSettings(str(random_checkpoint), 8, "cpu"))
    for block in iter_blocks(grid.height, grid.width, 256):
        host = predict_block(block, [scene], grid, tiling, predictor, on_device=False)
        device = predict_block(block, [scene], grid, tiling, predictor, on_device=True)
        assert device.tiles == host.tiles > 0 and device.interior == host.interior
        np.testing.assert_array_equal(device.classes, host.classes)
        np.testing.assert_array_equal(device.confidence, host.confidence)
        assert [f.rect for f in device.frames] == [f.rect for f in host.frames]
        for got, want in zip(device.frames, host.frames, strict=True):
            np.testing.assert_array_equal(got.sums, want.sums)


def test_polygons_streamed_in_slices_are_the_whole_mosaics_in_the_same_order(tmp_path, client2, monkeypatch):
    """The merged rows reach the client in slices (so its memory does not grow with the scene):
    the layer is the same, row for row, and equals polygonizing the whole mosaic at once."""
    from rasterio.features import shapes

    from geoseg import polygons
    from geoseg.config import VectorConfig
    from geoseg.synth import make_labels
    from geoseg.vector_io import LayerWriter

    spec = SceneSpec(600, 520, seed=4)
    labels = make_labels(spec)
    grid = OutputGrid(CRS.from_user_input(spec.crs).to_wkt(), tuple(spec.transform)[:6], 600, 520)
    legend = {k: f"class {k}" for k in range(7)}
    mosaic.create_mosaic(tmp_path / "mosaic.zarr", grid, 128, legend)
    blocks = list(iter_blocks(520, 600, 128))
    for b in blocks:
        part = labels[b.region]
        mosaic.write_block(tmp_path / "mosaic.zarr", b, part, np.full_like(part, 80))

    def layer(name: str) -> gpd.GeoDataFrame:
        path = tmp_path / f"{name}.parquet"
        writers = [(LayerWriter(path, grid.crs_wkt), None)]
        polygons.stream_polygons(client2, blocks, grid, str(tmp_path), legend, writers, VectorConfig())
        return gpd.read_parquet(path)

    monkeypatch.setattr(polygons, "BLOCKS_PER_SLICE", 100)
    whole = layer("whole")  # 25 blocks: one slice per group
    monkeypatch.setattr(polygons, "BLOCKS_PER_SLICE", 3)
    monkeypatch.setattr(polygons.LayerSink, "HELD", 1)  # and most results left on the workers a while
    sliced = layer("sliced")  # 9 slices per group
    assert len(sliced) == len(whole) > 100
    assert sliced["class_id"].tolist() == whole["class_id"].tolist()
    assert sliced.geometry.geom_equals_exact(whole.geometry, tolerance=0).all()
    oracle = list(shapes(labels, mask=labels != 255, connectivity=4))
    assert len(sliced) == len(oracle)
    counts = np.bincount(labels[labels != 255], minlength=7)
    per_class = sliced.groupby("class_id")["area_m2"].sum()
    for k, n in enumerate(counts):
        assert per_class.get(k, 0.0) == pytest.approx(n * grid.pixel_area)


def test_the_quicklook_is_drawn_from_the_coarsest_overview_level_that_fills_it(reference):
    """Not the whole mosaic read on the client: the level that still has the picture's size."""
    import zarr

    from geoseg.quicklook import downsample_classes

    store = reference / "mosaic.zarr"
    root = zarr.open_group(store, mode="r")
    assert root.attrs["geoseg"]["overviews"] == [2, 4]  # a 1000 x 700 mosaic
    np.testing.assert_array_equal(downsample_classes(store, 500), root["overviews/2/classes"][:])
    np.testing.assert_array_equal(downsample_classes(store, 2000), root["classes"][:])
    # a level less than twice the picture: sampled to the picture's size, not halved
    level = root["overviews/2/classes"][:]  # 350 rows, 500 columns
    picture = downsample_classes(store, 300)
    assert picture.shape == (210, 300)
    under = np.floor((np.arange(300) + 0.5) * 5 / 3).astype(int)  # the level's pixel under each centre
    np.testing.assert_array_equal(picture, level[np.ix_(under[:210], under)])


def test_a_replaced_mosaic_keeps_no_old_chunk_even_through_a_link_and_a_file_there_is_one_line(tmp_path):
    from geoseg import storage

    grid = OutputGrid(CRS.from_epsg(32633).to_wkt(), (10.0, 0.0, 500_000.0, 0.0, -10.0, 5_200_000.0), 256, 256)
    (tmp_path / "bigger_disk").mkdir()
    (tmp_path / "mosaic.zarr").symlink_to(tmp_path / "bigger_disk")  # a mosaic kept on another disk
    store = tmp_path / "mosaic.zarr"
    block = next(iter_blocks(256, 256, 128))
    mosaic.create_mosaic(store, grid, 128, {0: "water", 1: "forest"})
    mosaic.write_block(store, block, np.ones((128, 128), np.uint8), np.full((128, 128), 90, np.uint8))
    assert (mosaic.read_region(store, *block.region) == 1).all()
    mosaic.create_mosaic(store, grid, 128, {0: "water", 1: "forest"})  # replaced, as --overwrite does
    assert store.is_symlink() and (tmp_path / "bigger_disk" / "zarr.json").is_file()
    assert (mosaic.read_region(store, *block.region) == 255).all()  # the old block is gone
    (tmp_path / "file.zarr").write_text("not a store")
    with pytest.raises(storage.StorageError, match=r"file.zarr: is a file, not a folder to write into$"):
        mosaic.create_mosaic(tmp_path / "file.zarr", grid, 128, {0: "water"})


def test_a_block_that_cannot_be_read_fails_the_polygons_in_one_error_and_leaves_no_half_layer(tmp_path, client2):
    """A damaged chunk (truncated on disk): its block's polygon task fails, the error names it,
    no layer is left at its place, and the layer tasks after it are released unwritten."""
    from geoseg import polygons
    from geoseg.config import VectorConfig
    from geoseg.synth import make_labels
    from geoseg.vector_io import LayerWriter

    spec = SceneSpec(512, 384, seed=6)
    labels = make_labels(spec)
    grid = OutputGrid(CRS.from_user_input(spec.crs).to_wkt(), tuple(spec.transform)[:6], 512, 384)
    mosaic.create_mosaic(tmp_path / "mosaic.zarr", grid, 128, {k: f"class {k}" for k in range(7)})
    blocks = list(iter_blocks(384, 512, 128))
    for b in blocks:
        mosaic.write_block(tmp_path / "mosaic.zarr", b, labels[b.region], np.full_like(labels[b.region], 80))
    chunk = tmp_path / "mosaic.zarr" / "classes" / "c" / "1" / "2"
    chunk.write_bytes(chunk.read_bytes()[:20])
    writers = [(LayerWriter(tmp_path / "polygons.gpkg", grid.crs_wkt), None)]
    with pytest.raises(RuntimeError, match=r"mosaic.zarr: block 1_2 cannot be read \(RuntimeError: Zstd") as failure:
        polygons.stream_polygons(
            client2, blocks, grid, str(tmp_path), {k: str(k) for k in range(7)}, writers, VectorConfig()
        )
    assert len(str(failure.value).splitlines()) <= 3
    assert not (tmp_path / "polygons.gpkg").exists() and not list(tmp_path.glob(".polygons*"))
    time.sleep(0.5)  # the released tasks leave the scheduler
    assert not [
        k for k in client2.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.tasks)) if "polygons-" in str(k)
    ]


def test_a_layer_that_cannot_be_put_in_place_fails_the_run_after_the_quicklook_and_leaves_no_half_layer(
    tmp_path, random_checkpoint, scene_1000x700, client2, reference
):
    """The layers are closed (their index built, moved into place) while the quicklook is
    drawn: a GeoPackage that cannot be put in its place (a folder of that name is in OUT)
    still fails the run, naming it, with no temporary layer left beside it; the committed
    blocks stay, and a rerun once the folder is gone reuses them all and gives the same map."""
    (tmp_path / "polygons.gpkg").mkdir()
    cfg = run_config(random_checkpoint, [scene_1000x700[0]], tmp_path, "output.block_size=512")
    with pytest.raises(OSError) as failure:
        run(cfg, client2)
    # named by its place (the CLI's line is "FILENAME: STRERROR"), not by the temporary file
    assert failure.value.filename == str(tmp_path / "polygons.gpkg") and failure.value.strerror == "Is a directory"
    assert (tmp_path / "polygons.gpkg").is_dir() and not list(tmp_path.glob(".polygons*"))
    assert (tmp_path / "quicklook.png").stat().st_size > 0  # drawn beside the closing layers
    assert json.loads((tmp_path / "manifest.json").read_text())["status"] == "running"
    (tmp_path / "polygons.gpkg").rmdir()
    result = run(cfg, client2)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert result.ok and manifest["summary"]["reused"] == manifest["summary"]["blocks"] == 4
    np.testing.assert_array_equal(read_classes(tmp_path), read_classes(reference))
    assert len(gpd.read_file(tmp_path / "polygons.gpkg")) == len(gpd.read_file(reference / "polygons.gpkg"))


def test_overviews_written_after_the_blocks_equal_the_whole_mosaics_levels(tmp_path):
    """For a mosaic whose blocks were written by other means (a run writes its chunks itself)."""
    from geoseg.overviews import downsample
    from geoseg.synth import make_labels

    labels = make_labels(SceneSpec(600, 520, seed=8))
    grid = OutputGrid(CRS.from_epsg(32633).to_wkt(), (10.0, 0.0, 500_000.0, 0.0, -10.0, 5_200_000.0), 600, 520)
    store = tmp_path / "mosaic.zarr"
    mosaic.create_mosaic(store, grid, 128, {k: str(k) for k in range(7)})
    blocks = list(iter_blocks(520, 600, 128))
    confidence = (labels * 7 + 20).astype(np.uint8)
    for b in blocks:
        mosaic.write_block(store, b, labels[b.region], confidence[b.region])
    mosaic.write_overviews(store, blocks)
    assert mosaic.overview_factors_of(store) == [2, 4]
    for f in (2, 4):
        want_classes, want_confidence = downsample(labels, confidence, f)
        np.testing.assert_array_equal(
            mosaic.read_region(store, slice(None), slice(None), f"overviews/{f}/classes"), want_classes
        )
        np.testing.assert_array_equal(
            mosaic.read_region(store, slice(None), slice(None), f"overviews/{f}/confidence"), want_confidence
        )
