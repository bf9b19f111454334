"""Models saved by other trainers' own save functions, imported and run: each mosaic equals the
one from the same weights built natively."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch
import xarray as xr
import yaml
from conftest import BAND_NAMES, CLASS_NAMES, LEGEND, run_config

from geoseg.jobs import run
from geoseg.models import save_checkpoint
from geoseg.models.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from geoseg.models.importers import import_checkpoint
from geoseg.synth import SceneSpec, write_scene

MEAN, STD = [600.0, 900.0, 800.0, 2800.0], [300.0, 400.0, 500.0, 1200.0]
SIDECAR = {"bands": list(BAND_NAMES), "classes": list(CLASS_NAMES), "mean": MEAN, "std": STD}
GEOSEG = str(Path(sys.executable).parent / "geoseg")


def smp_unet() -> torch.nn.Module:
    torch.manual_seed(3)
    model = smp.Unet(encoder_name="resnet18", encoder_weights=None, in_channels=4, classes=len(CLASS_NAMES))
    for module in model.modules():  # batch-norm statistics that are not the identity
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return smp_unet()


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    return write_scene(SceneSpec(320, 288, seed=12), tmp_path_factory.mktemp("scene") / "s.tif")[0]


@pytest.fixture(scope="module")
def native_mosaic(tmp_path_factory, model, scene, client2) -> np.ndarray:
    """The same weights in geoseg's own format, as `geoseg train` would write them."""
    d = tmp_path_factory.mktemp("native")
    ckpt = Checkpoint("smp-unet", list(BAND_NAMES), LEGEND, MEAN, STD, {"encoder_name": "resnet18"})
    path = save_checkpoint(ckpt, model, d / "native.safetensors")
    return mosaic_with(str(path), scene, d / "out", client2)


def mosaic_with(checkpoint: str, scene: Path, out: Path, client) -> np.ndarray:
    assert run(run_config(checkpoint, [scene], out, "output.block_size=512", "output.polygons=false"), client).ok
    return xr.open_zarr(out / "mosaic.zarr")["classes"].values


def test_an_smp_folder_with_its_sidecar_runs_as_the_native_model(tmp_path, model, scene, native_mosaic, client2):
    folder = tmp_path / "smp-model"
    model.save_pretrained(str(folder))  # smp's own save function: config.json + model.safetensors
    (folder / "geoseg.yaml").write_text(yaml.safe_dump(SIDECAR))
    got = mosaic_with(str(folder), scene, tmp_path / "out", client2)  # straight from the folder
    np.testing.assert_array_equal(got, native_mosaic)
    assert len(np.unique(got)) >= 2


def test_a_lightning_checkpoint_imported_to_a_file_runs_as_the_native_model(
    tmp_path, model, scene, native_mosaic, client2
):
    # the layout of a TorchGeo SemanticSegmentationTask checkpoint (TorchGeo does not install
    # with the pinned torch here): Lightning's keys, the weights under "model."
    ckpt = {
        "epoch": 9,
        "global_step": 1200,
        "pytorch-lightning_version": "2.5.0",
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()} | {"criterion.weight": torch.ones(7)},
        "hyper_parameters": {
            "model": "unet",
            "backbone": "resnet18",
            "weights": None,
            "in_channels": 4,
            "num_classes": 7,
            "loss": "ce",
            "lr": 0.001,
        },
    }
    torch.save(ckpt, tmp_path / "task.ckpt")
    (tmp_path / "meta.yaml").write_text(yaml.safe_dump(SIDECAR))
    imported = tmp_path / "imported.safetensors"
    res = subprocess.run(
        [
            GEOSEG,
            "model",
            "import",
            str(tmp_path / "task.ckpt"),
            "--meta",
            str(tmp_path / "meta.yaml"),
            "--out",
            str(imported),
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    described = json.loads(
        subprocess.run([GEOSEG, "model", "inspect", str(imported)], capture_output=True, text=True).stdout
    )
    assert described["arch"] == "smp-unet" and described["arch_kwargs"]["encoder_name"] == "resnet18"
    assert described["bands"] == list(BAND_NAMES) and [c["name"] for c in described["classes"]] == CLASS_NAMES
    assert described["mean"] == MEAN and described["parameters"] == sum(p.numel() for p in model.parameters())
    np.testing.assert_array_equal(mosaic_with(str(imported), scene, tmp_path / "out", client2), native_mosaic)


def test_a_plain_state_dict_names_its_architecture_in_the_sidecar(tmp_path, model, scene, native_mosaic, client2):
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    meta = {**SIDECAR, "arch": "smp-unet", "arch_kwargs": {"encoder_name": "resnet18"}}
    (tmp_path / "weights.yaml").write_text(yaml.safe_dump(meta))  # found beside the weights
    np.testing.assert_array_equal(
        mosaic_with(str(tmp_path / "weights.pt"), scene, tmp_path / "out", client2), native_mosaic
    )
    ckpt = load_checkpoint(tmp_path / "weights.pt")
    assert len(ckpt.sha256) == 64 and ckpt.extra["imported_from"].endswith("weights.pt")
    # torch's legacy (pre-zip) format cannot be memory-mapped when telling checkpoints apart
    torch.save(model.state_dict(), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    (tmp_path / "legacy.yaml").write_text(yaml.safe_dump(meta))
    legacy = load_checkpoint(tmp_path / "legacy.pt")
    assert legacy.state_dict.keys() == ckpt.state_dict.keys()
    assert all(torch.equal(legacy.state_dict[k], ckpt.state_dict[k]) for k in ckpt.state_dict)


def test_mismatches_are_clear_errors(tmp_path, model):
    folder = tmp_path / "smp-model"
    model.save_pretrained(str(folder))
    with pytest.raises(CheckpointError, match="3 bands, but .* takes 4 input channels"):
        import_checkpoint(folder, {**SIDECAR, "bands": ["b", "g", "r"], "mean": [0] * 3, "std": [1] * 3})
    with pytest.raises(CheckpointError, match="5 classes, but .* predicts 7"):
        import_checkpoint(folder, {**SIDECAR, "classes": CLASS_NAMES[:5]})
    with pytest.raises(CheckpointError, match="`std` is missing"):
        import_checkpoint(folder, {k: v for k, v in SIDECAR.items() if k != "std"})
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    with pytest.raises(CheckpointError, match="must name its `arch`"):
        import_checkpoint(tmp_path / "weights.pt", SIDECAR)
    with pytest.raises(CheckpointError, match="do not fit architecture 'smp-unet'"):
        import_checkpoint(
            tmp_path / "weights.pt", {**SIDECAR, "arch": "smp-unet", "arch_kwargs": {"encoder_name": "resnet34"}}
        )
    with pytest.raises(CheckpointError, match="not a geoseg checkpoint.*weights.yaml"):
        load_checkpoint(tmp_path / "weights.pt")  # no sidecar beside it
    res = subprocess.run(
        [
            GEOSEG,
            "model",
            "import",
            str(tmp_path / "missing.ckpt"),
            "--meta",
            str(tmp_path / "m.yaml"),
            "--out",
            "x.safetensors",
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "m.yaml" in res.stderr
