"""Architectures, the checkpoint format and safe loading."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
from conftest import LEGEND, make_random_checkpoint, run_config

from geoseg.inference import InferenceSettings, Predictor, fuse_batch_norms
from geoseg.jobs import RunError, run
from geoseg.models import Checkpoint, available_architectures, build_model, load_checkpoint, save_checkpoint
from geoseg.models.checkpoint import CheckpointError
from geoseg.models.unet import UNet

SMALL = {"unet": {"depth": 2, "base_width": 8}, "fcn": {"base_width": 8}, "segnet": {"base_width": 8}}


@pytest.mark.parametrize("arch", available_architectures())
def test_every_architecture_maps_tiles_to_class_logits(arch):
    model = build_model(arch, 4, 7, **SMALL.get(arch, {"encoder_name": "resnet18"})).eval()
    with torch.inference_mode():
        assert model(torch.randn(2, 4, 64, 64)).shape == (2, 7, 64, 64)


@pytest.mark.parametrize("arch", ["unet", "smp-unet", "unetplusplus"])
def test_batch_norms_folded_into_convs_give_the_same_probabilities(arch):
    torch.manual_seed(0)
    model = build_model(arch, 4, 7, **SMALL.get(arch, {"encoder_name": "resnet18"}))
    for norm in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # trained-like statistics
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
        norm.weight.data.uniform_(0.5, 1.5)
        norm.bias.data.uniform_(-0.5, 0.5)
    model.eval()
    folded = copy.deepcopy(model)
    n = fuse_batch_norms(folded)
    norms_left = sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert n >= 4 and norms_left == sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) - n
    x = torch.randn(2, 4, 64, 64)
    with torch.inference_mode():
        want, got = torch.softmax(model(x), 1), torch.softmax(folded(x), 1)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert (want.argmax(1) == got.argmax(1)).float().mean() > 0.999


def test_classic_unet_has_the_papers_parts():
    net = UNet(4, 7, depth=4, base_width=64, batch_norm=False)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[0].kernel_size == (3, 3) and convs[-1].kernel_size == (1, 1)
    assert sum(isinstance(m, torch.nn.ConvTranspose2d) for m in net.modules()) == 4
    # channel widths double down the encoder: 64 .. 1024 as in the paper
    assert net.down[-1][0].out_channels == 1024
    # odd sizes work (the skip is padded to)
    assert net(torch.randn(1, 4, 75, 61)).shape == (1, 7, 75, 61)


def test_unknown_architecture_is_named():
    with pytest.raises(ValueError, match="unknown architecture 'vit'"):
        build_model("vit", 4, 7)


def test_checkpoint_round_trip_gives_the_same_predictions(tmp_path):
    path = make_random_checkpoint(tmp_path / "m.safetensors", seed=3)
    ckpt = load_checkpoint(path)
    assert ckpt.bands == ["blue", "green", "red", "nir"] and ckpt.classes == LEGEND and len(ckpt.sha256) == 64
    torch.manual_seed(3)
    original = build_model("unet", 4, 7, depth=2, base_width=8).eval()
    x = torch.randn(1, 4, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(ckpt.build()(x), original(x))


def test_weights_only_pt_checkpoints_load(tmp_path):
    ckpt = load_checkpoint(make_random_checkpoint(tmp_path / "m.safetensors"))
    meta = {**ckpt.metadata()}
    torch.save({"meta": meta, "state_dict": ckpt.state_dict}, tmp_path / "m.pt")
    again = load_checkpoint(tmp_path / "m.pt")
    assert again.arch == "unet"
    for k, v in ckpt.state_dict.items():
        torch.testing.assert_close(again.state_dict[k], v)


class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('x')",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_code_in_a_checkpoint_is_never_executed(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"meta": {}, "state_dict": _Evil(tmp_path / "geoseg_pwned")}, f)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(path)
    assert not (tmp_path / "geoseg_pwned").exists()


def test_missing_and_foreign_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="not a geoseg checkpoint.*plain.yaml"):
        load_checkpoint(tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="no such built-in model"):
        load_checkpoint("builtin:nope")


def test_a_header_read_gives_the_checkpoint_without_its_weights(tmp_path):
    """What a run's client reads: the same metadata and checksum as a whole read, no tensors."""
    whole, header = load_checkpoint("builtin:demo"), load_checkpoint("builtin:demo", weights=False)
    assert header.state_dict == {} and whole.state_dict
    assert (header.arch, header.bands, header.classes, header.mean, header.std, header.sha256) == (
        whole.arch, whole.bands, whole.classes, whole.mean, whole.std, whole.sha256
    )  # fmt: skip
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))  # another trainer's: read whole
    with pytest.raises(CheckpointError, match="not a geoseg checkpoint.*plain.yaml"):
        load_checkpoint(tmp_path / "plain.safetensors", weights=False)


def test_weights_that_do_not_fit_the_architecture(tmp_path):
    ckpt = Checkpoint("unet", ["b", "g", "r", "n"], LEGEND, [0.0] * 4, [1.0] * 4, {"depth": 3, "base_width": 8})
    save_checkpoint(ckpt, build_model("unet", 4, 7, depth=2, base_width=8), tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="do not fit architecture"):
        load_checkpoint(tmp_path / "m.safetensors").build()


def test_smp_encoder_weights_from_a_local_file(tmp_path):
    from safetensors.torch import save_file

    donor = build_model("smp-unet", 4, 7, encoder_name="resnet18")
    save_file({k: v.contiguous() for k, v in donor.encoder.state_dict().items()}, str(tmp_path / "enc.safetensors"))
    model = build_model(
        "smp-unet", 4, 7, encoder_name="resnet18", encoder_weights_path=str(tmp_path / "enc.safetensors")
    )
    for k, v in donor.encoder.state_dict().items():
        torch.testing.assert_close(model.encoder.state_dict()[k], v)


def test_normalisation_uses_the_checkpoint_stats(tmp_path):
    predictor = Predictor(
        load_checkpoint(make_random_checkpoint(tmp_path / "m.safetensors")),
        InferenceSettings(str(tmp_path / "m.safetensors"), device="cpu"),
    )
    bands = np.array([600.0, 900.0, 800.0, 2800.0], np.float32)[:, None, None] * np.ones((4, 2, 2), np.float32)
    bands[:, 0, 0] += np.array([300.0, 400.0, 500.0, 1200.0])
    valid = np.ones((2, 2), bool)
    valid[1, 1] = False
    out = predictor.normalize(bands, valid)
    np.testing.assert_allclose(out[:, 0, 0], 1.0)
    np.testing.assert_allclose(out[:, 0, 1], 0.0)
    assert (out[:, 1, 1] == 0).all()


def test_config_classes_that_differ_from_the_model_are_refused(tmp_path, random_checkpoint, scene_1000x700, client2):
    cfg = run_config(
        random_checkpoint,
        [scene_1000x700[0]],
        tmp_path,
        "classes=[{id: 0, name: sea, color: '#0000ff'}, {id: 1, name: land, color: '#00ff00'}]",
    )
    with pytest.raises(RunError, match="do not match the config"):
        run(cfg, client2)
