"""The shipped demo model through the full pipeline on a scene it has never seen."""

from __future__ import annotations

import numpy as np
import rasterio
import xarray as xr
from conftest import CLASS_NAMES, run_config

from geoseg.jobs import run
from geoseg.metrics import confusion_matrix, summarize
from geoseg.models import load_checkpoint
from geoseg.synth import SceneSpec, write_scene
from pipelines.train_demo_model import TRAIN_SEEDS, VAL_SEED

HELD_OUT_SEED = 4242


def test_demo_checkpoint_is_small_and_described():
    ckpt = load_checkpoint("builtin:demo")
    assert ckpt.bands == ["blue", "green", "red", "nir"]
    assert [c["name"] for c in ckpt.classes] == CLASS_NAMES
    assert sum(v.numel() for v in ckpt.state_dict.values()) < 2_000_000


def test_demo_model_miou_on_a_held_out_scene_through_the_pipeline(tmp_path, client2):
    assert HELD_OUT_SEED not in (*TRAIN_SEEDS, VAL_SEED)
    scene, labels = write_scene(
        SceneSpec(900, 650, HELD_OUT_SEED), tmp_path / "scene.tif", tmp_path / "labels.tif", illumination=0.88
    )
    cfg = run_config(
        "builtin:demo",
        [scene],
        tmp_path / "out",
        "tiling.tile_size=256",
        "tiling.overlap=32",
        "output.block_size=512",
        "output.polygons=false",
    )
    assert run(cfg, client2).ok
    pred = xr.open_zarr(tmp_path / "out" / "mosaic.zarr")["classes"].values
    with rasterio.open(labels) as src:
        truth = src.read(1)
    summary = summarize(confusion_matrix(truth, pred, 7), [str(k) for k in range(7)])
    print(summary["iou"], summary["miou"])
    assert summary["miou"] >= 0.85
    assert summary["overall_accuracy"] >= 0.95
    np.testing.assert_array_equal(pred == 255, truth == 255)
