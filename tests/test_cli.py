"""The command line as a user runs it: real subprocesses, real files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import xarray as xr
from conftest import CLASS_NAMES, cli_config, run_cli_args

from geoseg.jobs import run

GEOSEG = [sys.executable, "-m", "geoseg"]


def geoseg(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([*GEOSEG, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_commands_that_run_no_model_import_no_torch(tmp_path, random_checkpoint, scene_1000x700):
    """export, vectorize, change of finished runs and view load no model: neither their client nor
    their workers' tasks (polygons, overviews, change blocks) import torch, 2 s of every start here.
    Nor does a run's client plan a run of a geoseg checkpoint: it reads the header, the workers the weights."""
    modules = "geoseg.cli geoseg.jobs geoseg.blocks geoseg.polygons geoseg.export geoseg.transitions geoseg.view"
    loaded = "sorted(m for m in sys.modules if m.startswith('torch'))[:3]"
    out = str(tmp_path / "out")
    settings = [f"model.checkpoint={str(random_checkpoint)!r}", f"inputs=[{str(scene_1000x700[0])!r}]", f"out={out!r}"]
    plan = (
        "from geoseg.config import load_config; from geoseg.planning import plan_run; "
        f"plan = plan_run(load_config(None, {settings!r})); "
        "assert plan.ckpt.bands and plan.ckpt.sha256 and len(plan.blocks) == 1"
    )
    for code in (f"import sys; import {', '.join(modules.split())}", f"import sys; {plan}"):
        res = subprocess.run([sys.executable, "-c", f"{code}; print({loaded})"], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == "[]"


def test_synth_writes_a_georeferenced_scene_and_labels(tmp_path):
    synth = ["synth", "--seed", "4", "--width", "300", "--height", "200", "--crs", "EPSG:32632"]
    res = geoseg(*synth, "--out", str(tmp_path / "s.tif"), "--labels", str(tmp_path / "l.tif"))
    assert res.returncode == 0, res.stderr
    with rasterio.open(tmp_path / "s.tif") as src, rasterio.open(tmp_path / "l.tif") as lab:
        assert (src.count, src.dtypes[0], src.crs.to_epsg(), src.res) == (4, "uint16", 32632, (10.0, 10.0))
        assert src.nodata == 0 and lab.nodata == 255
        labels = lab.read(1)
        assert ((src.read_masks(1) == 0) == (labels == 255)).all()
        assert len(np.unique(labels[labels != 255])) >= 4
    # the same seed gives the same scene
    geoseg(*synth, "--out", str(tmp_path / "t.tif"))
    with rasterio.open(tmp_path / "s.tif") as a, rasterio.open(tmp_path / "t.tif") as b:
        np.testing.assert_array_equal(a.read(), b.read())


def test_run_with_two_workers_writes_all_outputs(tmp_path, random_checkpoint, scene_1000x700):
    out = tmp_path / "out"
    res = geoseg(
        *run_cli_args(
            scene_1000x700[0],
            out,
            f"model.checkpoint={random_checkpoint}",
            "cluster.n_workers=2",
            "output.block_size=512",
        ),
        cwd=Path(__file__).parent.parent,
    )
    assert res.returncode == 0, res.stderr
    ds = xr.open_zarr(out / "mosaic.zarr")
    assert ds["classes"].shape == (700, 1000)
    gdf = gpd.read_file(out / "polygons.gpkg")
    assert len(gdf) > 0 and set(gdf["class_name"]) <= set(CLASS_NAMES)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["summary"]["blocks"] == 4 and manifest["summary"]["failed_blocks"] == 0
    assert manifest["config"]["cluster"]["n_workers"] == 2
    assert (out / "quicklook.png").stat().st_size > 10_000
    assert "Dask dashboard: http" in res.stderr + res.stdout


def test_bad_set_key_is_a_one_line_error(tmp_path):
    res = geoseg("run", "configs/demo.yaml", "--set", "tiling.tile_sise=128", cwd=Path(__file__).parent.parent)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert "tiling.tile_sise: unknown key" in lines[0]
    assert "Traceback" not in res.stderr


def test_verbose_adds_the_traceback_and_keeps_the_exit_code_of_a_users_error(tmp_path):
    res = geoseg("-v", "export", str(tmp_path / "never-ran"))
    assert res.returncode == 2
    assert "Traceback" in res.stderr and res.stderr.strip().splitlines()[-1].endswith(
        "not a geoseg run (no manifest.json)"
    )


def test_bad_set_value_names_the_key(tmp_path):
    res = geoseg("run", "configs/demo.yaml", "--set", "tiling.blend=bilinear", cwd=Path(__file__).parent.parent)
    assert res.returncode == 2
    assert "tiling.blend" in res.stderr and "Traceback" not in res.stderr


def test_a_crs_to_reproject_to_that_is_none_is_one_line_before_any_work(tmp_path):
    res = geoseg(
        "run", "configs/demo.yaml", "--set", "vector.reproject_to=EPSG:99999", cwd=Path(__file__).parent.parent
    )
    assert res.returncode == 2 and "vector.reproject_to" in res.stderr and "not a CRS: 'EPSG:99999'" in res.stderr


def test_missing_config_is_a_clear_error(tmp_path):
    res = geoseg("run", str(tmp_path / "nope.yaml"))
    assert res.returncode == 2 and "config file not found" in res.stderr


def test_jobqueue_without_its_extra_is_a_clear_error(tmp_path, scene_1000x700):
    import importlib.util

    if importlib.util.find_spec("dask_jobqueue") is not None:
        pytest.skip("dask-jobqueue is installed")
    res = geoseg(
        *run_cli_args(scene_1000x700[0], tmp_path / "o", "cluster.jobqueue={kind: slurm, jobs: 2}"),
        cwd=Path(__file__).parent.parent,
    )
    assert res.returncode == 2
    assert "cluster.jobqueue needs dask-jobqueue" in res.stderr and "Traceback" not in res.stderr


def test_a_log_that_is_no_terminal_keeps_each_record_on_one_line(tmp_path):
    """A batch job's log (to a file or a pipe): a long location stays whole on its line."""
    missing = tmp_path / ("S2B_MSIL2A_20240612T100559_N0510_R022_T33UVP_20240612T143412_" * 2 + "missing.tif")
    res = geoseg(*run_cli_args(missing, tmp_path / "out"), cwd=Path(__file__).parent.parent)
    assert res.returncode == 2
    line = next(ln for ln in res.stdout.splitlines() if "skipping scene" in ln)
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
    assert re.fullmatch(rf"{stamp} ERROR skipping scene {re.escape(str(missing))}: file not found", line), line


def test_paths_on_the_command_line_are_taken_as_typed(tmp_path):
    """Quotes, a backslash and a "#" are a path's own: no YAML reads them."""
    odd = tmp_path / 'O\'Brien "x" #1 back\\slash.tif'
    res = geoseg(*run_cli_args(odd, tmp_path / "o'ut #2"), cwd=Path(__file__).parent.parent)
    assert res.returncode == 2 and "not plain YAML" not in res.stderr
    assert f"skipping scene {odd}: file not found" in res.stdout


def test_vectorize_again_with_a_minimum_mapping_unit(tmp_path, random_checkpoint, scene_1000x700, client1):
    out = tmp_path / "out"
    assert run(cli_config(scene_1000x700[0], out, f"model.checkpoint={random_checkpoint}"), client1).ok
    before = gpd.read_file(out / "polygons.gpkg")
    res = geoseg(
        "vectorize", str(out), "--set", "vector.mmu_pixels=50", "--set", "cluster.n_workers=1",
        "--set", "vector.formats=[gpkg, parquet]",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    after = gpd.read_file(out / "polygons.gpkg")
    assert len(after) < len(before)
    assert after["area_m2"].min() >= 50 * 100 * 0.999
    assert after["area_m2"].sum() == pytest.approx(before["area_m2"].sum())
    assert len(gpd.read_parquet(out / "polygons.parquet")) == len(after)
    # the manifest and the run's item name the layer written again
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["outputs"]["polygons_parquet"] == str(out / "polygons.parquet")
    assert manifest["config"]["vector"]["mmu_pixels"] == 50  # what an export of the run starts from
    assert "polygons.parquet" in json.loads((out / "item.json").read_text())["assets"]
    # written again without the GeoParquet: the old one (the old polygons) goes, from the item too
    res = geoseg("vectorize", str(out), "--set", "vector.formats=[gpkg]", "--set", "cluster.n_workers=1")
    assert res.returncode == 0, res.stderr
    assert not (out / "polygons.parquet").exists() and (out / "polygons.gpkg").exists()
    assert "polygons_parquet" not in json.loads((out / "manifest.json").read_text())["outputs"]
    assert "polygons.parquet" not in json.loads((out / "item.json").read_text())["assets"]
    # every command that takes --set reports a bad key or value in one line, as `run` does
    for command, item in (("export", "vector.mmu_pixel=9"), ("vectorize", "vector.mmu_pixels=lots")):
        assert_one_line_error(geoseg(command, str(out), "--set", item), item.split("=")[0])
    assert_one_line_error(geoseg("change", str(out), str(out), "--set", "min_confidence=high"), "min_confidence")


def assert_one_line_error(res: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit code 2, one line on stderr holding every fragment, no traceback."""
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_an_output_that_is_a_file_or_not_writable_is_one_line(tmp_path, scene_1000x700):
    repo = Path(__file__).parent.parent
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    res = geoseg(*run_cli_args(scene_1000x700[0], taken), cwd=repo)
    assert_one_line_error(res, str(taken), "exists and is not a folder")
    assert taken.read_text() == "keep me"
    unwritable = Path("/sys/geoseg-test-out")  # sysfs: not even root may create a folder there
    res = geoseg(*run_cli_args(scene_1000x700[0], unwritable), cwd=repo)
    assert_one_line_error(res, str(unwritable), "cannot write the output folder")


def test_a_yaml_tag_in_set_is_one_line(tmp_path):
    res = geoseg(
        "run", "configs/demo.yaml", "--set", "out=!!python/object/apply:os.getcwd []", cwd=Path(__file__).parent.parent
    )
    assert_one_line_error(res, "--set", "not plain YAML", "python/object/apply:os.getcwd")


def test_a_checkpoint_that_is_a_folder_is_named_as_such(tmp_path, scene_1000x700):
    res = geoseg(
        *run_cli_args(scene_1000x700[0], tmp_path / "out", f"model.checkpoint={tmp_path}"),
        cwd=Path(__file__).parent.parent,
    )
    assert_one_line_error(res, str(tmp_path), "is a folder, not a checkpoint file")
    assert not (tmp_path / "out").exists()  # checked before anything was written, or a cluster started


def test_run_without_out_says_where_it_writes(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("inputs: [missing.tif]\ncluster: {n_workers: 1}\n")
    res = geoseg("run", str(config), cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 2, res.stderr
    assert "no --out given" in lines[0] and str(config) in lines[0] and str(tmp_path / "out") in lines[0]
    assert "missing.tif" in lines[1]
    assert not (tmp_path / "out").exists()  # nothing left behind by a failed run


def test_a_glob_or_folder_that_matches_nothing_is_named(tmp_path):
    repo = Path(__file__).parent.parent
    pattern = str(tmp_path / "scenes" / "*.tif")
    assert_one_line_error(
        geoseg("run", "configs/demo.yaml", "--input", pattern, "--out", str(tmp_path / "o"), cwd=repo), pattern
    )
    (tmp_path / "empty").mkdir()
    res = geoseg("run", "configs/demo.yaml", "--input", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), cwd=repo)
    assert_one_line_error(res, str(tmp_path / "empty"))
    assert not (tmp_path / "o").exists()


def test_inputs_and_checkpoint_are_checked_before_any_cluster(tmp_path, scene_1000x700):
    """With a scheduler address nothing listens on, a bad input or checkpoint is still what is
    reported: they are checked before a cluster is reached."""
    repo = Path(__file__).parent.parent
    nowhere = "cluster.address=tcp://127.0.0.1:9"
    missing = tmp_path / "missing.tif"
    res = geoseg(*run_cli_args(missing, tmp_path / "o", nowhere), cwd=repo)
    assert_one_line_error(res, str(missing), "file not found")
    res = geoseg(*run_cli_args(scene_1000x700[0], tmp_path / "o", nowhere, f"model.checkpoint={missing}"), cwd=repo)
    assert_one_line_error(res, str(missing))
    # the client reads a checkpoint's header alone: weights cut short are still refused there
    demo = (repo / "geoseg" / "data" / "demo_model.safetensors").read_bytes()
    (truncated := tmp_path / "truncated.safetensors").write_bytes(demo[: len(demo) // 2])
    res = geoseg(*run_cli_args(scene_1000x700[0], tmp_path / "o", nowhere, f"model.checkpoint={truncated}"), cwd=repo)
    assert_one_line_error(res, str(truncated), "cannot read checkpoint")
    assert not (tmp_path / "o").exists()


def test_a_run_that_fails_before_its_first_block_removes_the_out_it_created(tmp_path, scene_1000x700):
    repo = Path(__file__).parent.parent
    out = tmp_path / "o"
    res = geoseg(
        *run_cli_args(scene_1000x700[0], out, "cluster.address=tcp://127.0.0.1:9", "cluster.connect_timeout_s=3"),
        cwd=repo,
    )
    assert res.returncode != 0
    assert "127.0.0.1:9" in res.stderr and "Traceback" not in res.stderr
    assert not out.exists()


def test_a_run_with_a_bad_scene_names_it_once_and_ends_with_the_count(tmp_path, random_checkpoint, scene_1000x700):
    """Each failure is logged once, as the run meets it; the run's last line counts them and says
    where they are listed."""
    bad = tmp_path / "notes.tif"
    bad.write_text("not a raster")
    out = tmp_path / "out"
    args = run_cli_args(scene_1000x700[0], out, f"model.checkpoint={random_checkpoint}", "cluster.n_workers=1")
    res = geoseg(*args, "--input", str(bad), cwd=Path(__file__).parent.parent)
    assert res.returncode == 1, res.stderr
    assert len([line for line in res.stdout.splitlines() if str(bad) in line]) == 1
    assert (
        res.stdout.strip().splitlines()[-1].endswith(f"1 scene(s) and 0 block(s) failed; see {out / 'manifest.json'}")
    )
    scenes = {s["path"]: s for s in json.loads((out / "manifest.json").read_text())["scenes"]}
    assert scenes[str(bad)]["status"] == "failed" and scenes[str(scene_1000x700[0])]["status"] == "ok"
