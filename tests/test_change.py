"""Change detection on two synthetic dates with planted changes and an illumination shift."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import rioxarray  # noqa: F401
import xarray as xr
from conftest import run_config
from PIL import Image

from geoseg import mosaic
from geoseg.change import detect_change, drop_small_regions, transition_matrix
from geoseg.config import load_change_config
from geoseg.jobs import RunError, change_dates, run, run_change
from geoseg.synth import SceneSpec, write_scene, write_second_date
from geoseg.tiling import iter_blocks


@pytest.fixture(scope="module")
def two_dates(tmp_path_factory, client2):
    d = tmp_path_factory.mktemp("change")
    a_scene, a_labels = write_scene(SceneSpec(800, 600, seed=61), d / "a.tif", d / "a_labels.tif", illumination=1.0)
    b_scene, b_labels = write_second_date(a_scene, d / "b.tif", d / "b_labels.tif", n_changes=6, illumination=0.82)
    runs = []
    for name, scene in (("run_a", a_scene), ("run_b", b_scene)):
        out = d / name
        assert run(
            run_config(
                "builtin:demo",
                [scene],
                out,
                "tiling.tile_size=256",
                "tiling.overlap=32",
                "output.block_size=512",
                "output.polygons=false",
            ),
            client2,
        ).ok
        runs.append(out)
    cfg = load_change_config(None, ["block_size=256", "mmu_pixels=20", "min_confidence=50"])
    result = run_change(runs[0], runs[1], d / "change", cfg, client2)
    with rasterio.open(a_labels) as a, rasterio.open(b_labels) as b:
        truth = (a.read(1) != b.read(1)) & (a.read(1) != 255)
    return d, result, truth


def test_planted_changes_are_found(two_dates):
    d, _, truth = two_dates
    changed = xr.open_zarr(d / "change" / "change.zarr")["changed"].values == 1
    iou = (changed & truth).sum() / (changed | truth).sum()
    assert truth.sum() > 2000
    assert iou >= 0.8, iou


def test_illumination_shift_alone_is_not_change(two_dates):
    d, _, truth = two_dates
    changed = xr.open_zarr(d / "change" / "change.zarr")["changed"].values == 1
    far = ~truth
    assert (changed & far).sum() / far.sum() < 0.005


def test_matrix_totals_equal_the_valid_pixels_and_files_agree(two_dates):
    d, result, _ = two_dates
    ds = xr.open_zarr(d / "change" / "change.zarr")
    valid = (ds["from_class"].values != 255) & (ds["to_class"].values != 255)
    assert result.matrix.sum() == valid.sum()
    doc = json.loads((d / "change" / "transitions.json").read_text())
    assert np.array(doc["pixels"]).tolist() == result.matrix.tolist()
    assert doc["changed_pixels"] == int((ds["changed"].values == 1).sum())
    csv = (d / "change" / "transitions.csv").read_text().splitlines()
    assert csv[0].startswith("unit,from \\ to,water,forest")
    assert len(csv) == 1 + 2 * 7
    with Image.open(d / "change" / "transitions.png") as img:
        assert img.size[0] > 500
    assert ds.rio.crs.to_epsg() == 32633


def test_nodata_in_either_date_is_nodata_not_change(two_dates):
    d, _, _ = two_dates
    ds = xr.open_zarr(d / "change" / "change.zarr")
    a = xr.open_zarr(d / "run_a" / "mosaic.zarr")["classes"].values
    assert (ds["changed"].values[a == 255] == 255).all()
    assert (ds["transition"].values[a == 255] == 255).all()


def test_change_polygons_carry_from_and_to(two_dates):
    d, _, _ = two_dates
    gdf = gpd.read_file(d / "change" / "change_polygons.gpkg")
    assert {"from_class", "to_class", "from_name", "to_name", "area_m2"} <= set(gdf.columns)
    assert (gdf["from_class"] != gdf["to_class"]).all()
    changed = xr.open_zarr(d / "change" / "change.zarr")["changed"].values == 1
    assert gdf["area_m2"].sum() == pytest.approx(changed.sum() * 100.0)
    assert set(zip(gdf["from_name"], gdf["to_name"], strict=True)) & {("forest", "bare soil"), ("cropland", "built-up")}


def test_change_does_not_depend_on_the_block_size(two_dates, client2):
    d, _, _ = two_dates
    cfg = load_change_config(None, ["block_size=1024", "mmu_pixels=20", "min_confidence=50", "polygons=false"])
    run_change(d / "run_a", d / "run_b", d / "change_1024", cfg, client2)
    for name in ("changed", "transition"):
        a = xr.open_zarr(d / "change" / "change.zarr")[name].values
        b = xr.open_zarr(d / "change_1024" / "change.zarr")[name].values
        np.testing.assert_array_equal(a, b)


def test_change_run_resumes_only_missing_blocks(two_dates, client2):
    d, first, _ = two_dates
    before = xr.open_zarr(d / "change" / "change.zarr")["transition"].values
    grid = mosaic.read_grid(d / "change" / "change.zarr")
    for block in iter_blocks(grid.height, grid.width, 256):  # markers and pixels lost: a rerun writes them
        if block.key in ("0_1", "1_2"):
            (d / "change" / ".geoseg" / "blocks" / f"{block.key}.json").unlink()
            sentinel = np.full((block.rows.size, block.cols.size), 254, np.uint8)
            mosaic.write_region(d / "change" / "change.zarr", block, {"transition": sentinel})
    assert not np.array_equal(xr.open_zarr(d / "change" / "change.zarr")["transition"].values, before)
    cfg = load_change_config(None, ["block_size=256", "mmu_pixels=20", "min_confidence=50"])
    again = run_change(d / "run_a", d / "run_b", d / "change", cfg, client2)
    assert (again.computed, again.reused) == (2, 10)
    assert again.matrix.tolist() == first.matrix.tolist()
    np.testing.assert_array_equal(xr.open_zarr(d / "change" / "change.zarr")["transition"].values, before)
    changed = load_change_config(None, ["block_size=256", "mmu_pixels=5"])
    with pytest.raises(RunError, match="--overwrite"):
        run_change(d / "run_a", d / "run_b", d / "change", changed, client2)


def test_a_change_is_not_written_into_either_run(two_dates, client2):
    d, _, _ = two_dates
    for out in (d / "run_a", d / "run_b" / "change"):
        with pytest.raises(RunError, match="is the run .* or inside it"):
            run_change(d / "run_a", d / "run_b", out, load_change_config(None), client2)
    assert not (d / "run_b" / "change").exists()


def test_runs_that_do_not_overlap_are_refused(tmp_path, two_dates, client2):
    d, _, _ = two_dates
    far = write_scene(SceneSpec(64, 64, seed=1, origin=(700_000.0, 5_600_000.0)), tmp_path / "far.tif")[0]
    run(run_config("builtin:demo", [far], tmp_path / "far_run", "output.polygons=false"), client2)
    with pytest.raises(RunError, match="do not overlap"):
        run_change(d / "run_a", tmp_path / "far_run", tmp_path / "c", load_change_config(None), client2)
    assert not (tmp_path / "c").exists()  # the output folder it made is removed with nothing in it
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match="do not overlap"):
        run_change(d / "run_a", tmp_path / "far_run", tmp_path / "kept", load_change_config(None), client2)
    assert (tmp_path / "kept" / "notes.txt").read_text() == "mine"  # one it did not make stays


def test_change_maths_with_confidence_and_mmu():
    a = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [2, 2, 255, 2]], np.uint8)
    b = np.array([[5, 5, 1, 4], [5, 5, 1, 1], [2, 3, 2, 2]], np.uint8)
    conf = np.full(a.shape, 90, np.uint8)
    low = conf.copy()
    low[2, 1] = 10
    res = detect_change(a, b, conf, low, 7, min_confidence=50, mmu_pixels=2)
    assert res.changed.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 255, 0]]  # the lone 1->4 is below the MMU
    m = transition_matrix(res.transition, 7)
    assert m.sum() == 11 and m[1, 5] == 4 and m[2, 2] == 3 and m[1, 1] == 4
    assert drop_small_regions(np.eye(3, dtype=bool), 2).sum() == 0


def test_two_scene_sets_in_one_go_from_the_cli(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parent.parent
    a = write_scene(SceneSpec(300, 256, seed=71), tmp_path / "a.tif")[0]
    b = write_second_date(a, tmp_path / "b.tif", None, n_changes=2, illumination=0.9)[0]
    (tmp_path / "change.yaml").write_text(
        f"run_config: {root / 'configs' / 'demo.yaml'}\n"
        f"date_a: ['{a}']\ndate_b: ['{b}']\nmin_confidence: 50\nmmu_pixels: 10\n"
        "cluster: {n_workers: 1}\n"
    )
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "geoseg",
            "change",
            "--config",
            str(tmp_path / "change.yaml"),
            "--out",
            str(tmp_path / "out"),
            "--set",
            "block_size=128",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    # both dates' runs and the change on one cluster: the change config's, which sets one
    assert (res.stdout + res.stderr).count("Dask dashboard:") == 1, res.stderr
    for name in (
        "date_a/mosaic.zarr",
        "date_b/mosaic.zarr",
        "change.zarr",
        "change_polygons.gpkg",
        "transitions.csv",
        "transitions.json",
        "transitions.png",
    ):
        assert (tmp_path / "out" / name).exists(), name
    doc = json.loads((tmp_path / "out" / "transitions.json").read_text())
    valid = (xr.open_zarr(tmp_path / "out" / "change.zarr")["transition"].values != 255).sum()
    assert doc["valid_pixels"] == valid and doc["changed_pixels"] > 0


def test_dates_without_a_cluster_in_the_change_config_run_on_the_run_configs(tmp_path):
    import yaml

    root = Path(__file__).parent.parent
    a = write_scene(SceneSpec(300, 256, seed=72), tmp_path / "a.tif")[0]
    b = write_second_date(a, tmp_path / "b.tif", None, n_changes=2, illumination=0.9)[0]
    run_config = yaml.safe_load((root / "configs" / "demo.yaml").read_text())
    run_config["cluster"] = {"n_workers": 1, "dashboard": False, "memory_limit": "3GB"}
    run_config["output"]["block_size"] = 256
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run_config))
    (tmp_path / "change.yaml").write_text(f"run_config: run.yaml\ndate_a: ['{a}']\ndate_b: ['{b}']\nblock_size: 128\n")
    result = change_dates(load_change_config(tmp_path / "change.yaml"), str(tmp_path / "out"))
    assert int(result.matrix.sum()) > 0
    # each date's manifest records the cluster its run had: the run config's, not the change
    # config's default (a dashboard, memory "auto")
    for name in ("date_a", "date_b"):
        manifest = json.loads((tmp_path / "out" / name / "manifest.json").read_text())
        assert manifest["status"] == "finished"
        cluster = manifest["config"]["cluster"]
        assert (cluster["n_workers"], cluster["dashboard"], cluster["memory_limit"]) == (1, False, "3GB")


def test_the_change_has_a_stac_item_with_its_outputs(two_dates, tmp_path):
    d, result, _ = two_dates
    item = json.loads((d / "change" / "item.json").read_text())
    (tmp_path / "core.json").write_text(json.dumps({**item, "stac_extensions": []}))
    rustac = str(Path(sys.executable).parent / "rustac")
    assert subprocess.run([rustac, "validate", str(tmp_path / "core.json")], capture_output=True).returncode == 0
    assert {"change.zarr", "change_polygons.gpkg", "transitions.csv", "transitions.json"} <= set(item["assets"])
    for asset in item["assets"].values():
        assert (d / "change" / asset["href"]).exists(), asset["href"]
    transitions = item["assets"]["change_polygons.gpkg"]["classification:classes"]
    assert len(transitions) == 49 and transitions[1]["description"] == "water -> forest"
    assert item["properties"]["proj:shape"] == [600, 800]
    assert "land-cover change from" in item["properties"]["processing:lineage"]


def test_the_view_of_a_change_shows_the_transitions_and_both_dates(two_dates):
    import io
    import threading
    import urllib.request

    from PIL import Image

    from geoseg.maptiles import WEB_MERCATOR
    from geoseg.view import ViewServer

    d, _, truth = two_dates
    server = ViewServer(str(d / "change"), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:

        def get(path: str) -> bytes:
            with urllib.request.urlopen(server.url + path, timeout=30) as response:
                return response.read()

        described = json.loads(get("/run.json"))
        assert described["kind"] == "change"
        assert [layer["name"] for layer in described["layers"]] == ["transition", "from_class", "to_class"]
        tilejson = json.loads(get("/transition/tilejson.json"))
        west, south, east, north = tilejson["bounds"]
        t = WEB_MERCATOR.tile((west + east) / 2, (south + north) / 2, tilejson["maxzoom"] - 2)
        drawn = {}
        for layer in ("transition", "from_class", "to_class"):
            rgba = np.asarray(Image.open(io.BytesIO(get(f"/{layer}/tiles/{t.z}/{t.x}/{t.y}.png"))))
            drawn[layer] = (rgba[..., 3] == 255).mean()
        assert drawn["from_class"] > 0.5 and drawn["to_class"] > 0.5  # both dates, whole
        assert 0 < drawn["transition"] < 0.5 * drawn["from_class"]  # only what changed
    finally:
        server.shutdown()
        server.server_close()
