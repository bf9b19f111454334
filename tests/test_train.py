"""Training on real GeoTIFF pairs: outputs, reproducibility, clear errors on bad data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin

from geoseg.config import ConfigError
from geoseg.metrics import confusion_matrix, iou_per_class, summarize
from geoseg.models import load_checkpoint
from geoseg.synth import SceneSpec, write_scene
from geoseg.train import SegmentationLoss, load_train_config, train


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    out = []
    for seed in (1, 2, 3):
        img, lab = write_scene(SceneSpec(192, 160, seed), d / f"s{seed}.tif", d / f"l{seed}.tif")
        out.append({"image": str(img), "labels": str(lab)})
    return out


def tiny(pairs, out, *overrides):
    base = {
        "model": {"arch": "unet", "arch_kwargs": {"depth": 2, "base_width": 8}},
        "data": {"train": pairs[:2], "val": pairs[2:], "chip_size": 64, "chips_per_epoch": 32},
        "optim": {"epochs": 2, "batch_size": 8},
        "out": str(out),
    }
    return load_train_config(None, list(overrides), base=base)


def test_training_writes_a_usable_checkpoint_metrics_and_plots(tmp_path, pairs):
    path = train(tiny(pairs, tmp_path))
    ckpt = load_checkpoint(path)
    assert ckpt.arch == "unet" and ckpt.bands == ["blue", "green", "red", "nir"]
    assert [c["name"] for c in ckpt.classes][:3] == ["water", "forest", "grassland"]
    # normalisation stats come from the training rasters' valid pixels
    with rasterio.open(pairs[0]["image"]) as a, rasterio.open(pairs[1]["image"]) as b:
        px = np.concatenate([s.read(masked=True).reshape(4, -1).compressed().reshape(4, -1) for s in (a, b)], 1)
    np.testing.assert_allclose(ckpt.mean, px.mean(1), rtol=1e-4)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert len(metrics["history"]) == 2 and 0 <= metrics["final"]["miou"] <= 1
    assert np.array(metrics["final"]["confusion_matrix"]).shape == (7, 7)
    assert (tmp_path / "training.png").stat().st_size > 10_000


def test_fixed_seed_training_is_reproducible_on_cpu(tmp_path, pairs):
    a = load_checkpoint(train(tiny(pairs, tmp_path / "a", "optim.epochs=1", "device=cpu")))
    b = load_checkpoint(train(tiny(pairs, tmp_path / "b", "optim.epochs=1", "device=cpu")))
    for k in a.state_dict:
        torch.testing.assert_close(a.state_dict[k], b.state_dict[k], rtol=0, atol=0)


@pytest.mark.parametrize("loss", ["ce", "dice", "focal", "ce+dice", "focal+dice"])
def test_losses_ignore_nodata_and_reward_the_right_answer(loss):
    fn = SegmentationLoss(loss, 3, torch.tensor([1.0, 2.0, 1.0]))
    target = torch.tensor([[[0, 1], [2, 255]]])
    good = torch.nn.functional.one_hot(torch.tensor([[[0, 1], [2, 0]]]), 3).permute(0, 3, 1, 2).float() * 10
    bad = torch.nn.functional.one_hot(torch.tensor([[[1, 2], [0, 0]]]), 3).permute(0, 3, 1, 2).float() * 10
    assert fn(good, target) < fn(bad, target)
    # the nodata pixel's logits do not matter
    changed = good.clone()
    changed[0, :, 1, 1] = torch.tensor([0.0, 0.0, 50.0])
    torch.testing.assert_close(fn(changed, target), fn(good, target))


def test_label_raster_on_another_grid_is_named(tmp_path, pairs):
    lab = tmp_path / "shifted.tif"
    with rasterio.open(pairs[0]["labels"]) as src:
        profile = src.profile
        profile["transform"] = from_origin(600_000, 5_200_000, 10, 10)
        with rasterio.open(lab, "w", **profile) as dst:
            dst.write(src.read())
    with pytest.raises(ConfigError, match=r"shifted.tif: not on the grid of"):
        train(tiny([{"image": pairs[0]["image"], "labels": str(lab)}, pairs[1]], tmp_path / "o"))


def test_label_values_outside_the_classes_are_named(tmp_path, pairs):
    lab = tmp_path / "bad_values.tif"
    with rasterio.open(pairs[0]["labels"]) as src, rasterio.open(lab, "w", **src.profile) as dst:
        data = src.read(1)
        data[100, 150] = 42
        dst.write(data, 1)
    with pytest.raises(ConfigError, match=r"bad_values.tif: label values \[42\]"):
        train(tiny([{"image": pairs[0]["image"], "labels": str(lab)}], tmp_path / "o"))


def test_empty_training_set_is_refused(tmp_path, pairs):
    with pytest.raises(ConfigError, match="data.train is empty"):
        train(tiny([], tmp_path / "o"))


def test_metrics_from_a_confusion_matrix():
    truth = np.array([0, 0, 1, 1, 2, 255])
    pred = np.array([0, 1, 1, 1, 2, 0])
    cm = confusion_matrix(truth, pred, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 1]]
    np.testing.assert_allclose(iou_per_class(cm), [0.5, 2 / 3, 1.0])
    summary = summarize(cm, ["a", "b", "c"])
    assert summary["overall_accuracy"] == pytest.approx(0.8)
    assert summary["miou"] == pytest.approx((0.5 + 2 / 3 + 1) / 3)


def test_training_reads_its_pairs_from_a_store_and_writes_its_outputs_there(tmp_path, pairs, bucket):
    from pathlib import Path

    from geoseg import storage

    remote = []
    for pair in pairs:
        urls = {}
        for role, path in pair.items():
            urls[role] = f"{bucket}/training/{Path(path).name}"
            storage.write_bytes(urls[role], Path(path).read_bytes())
        remote.append(urls)
    out = f"{bucket}/training/out"
    path = train(tiny(remote, out, "optim.epochs=1", "device=cpu"))
    local = train(tiny(pairs, tmp_path, "optim.epochs=1", "device=cpu"))
    assert path == f"{out}/model.safetensors"
    a, b = load_checkpoint(path), load_checkpoint(local)
    for k in a.state_dict:  # the same data, wherever it lies: the same weights
        torch.testing.assert_close(a.state_dict[k], b.state_dict[k], rtol=0, atol=0)
    assert json.loads(storage.read_text(f"{out}/metrics.json"))["history"][0]["epoch"] == 1
    assert storage.read_bytes(f"{out}/training.png")[:4] == b"\x89PNG"
    with pytest.raises(ConfigError, match="read-only"):
        train(tiny(remote, "https://example.org/out"))


def test_an_output_that_cannot_be_written_is_named_before_any_epoch(tmp_path, pairs):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="a-file"):
        train(tiny(pairs, blocker / "out", "optim.epochs=50"))  # 50 epochs would take minutes
