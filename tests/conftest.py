"""Shared fixtures: real GeoTIFFs on disk, real checkpoints, a real Dask LocalCluster."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from distributed import Client, LocalCluster

from geoseg.config import load_config
from geoseg.models import Checkpoint, build_model, save_checkpoint
from geoseg.synth import BAND_NAMES, SceneSpec, write_scene

LEGEND = [
    {"id": 0, "name": "water", "color": "#1f78b4"},
    {"id": 1, "name": "forest", "color": "#1b7837"},
    {"id": 2, "name": "grassland", "color": "#a6d96a"},
    {"id": 3, "name": "cropland", "color": "#fee08b"},
    {"id": 4, "name": "built-up", "color": "#d73027"},
    {"id": 5, "name": "bare soil", "color": "#bf8a5a"},
    {"id": 6, "name": "road", "color": "#4d4d4d"},
]
CLASS_NAMES = [c["name"] for c in LEGEND]


def make_random_checkpoint(path: Path, seed: int = 0, arch: str = "unet", **arch_kwargs) -> Path:
    """A fixed-seed random model: its output is arbitrary but deterministic, which is all invariance needs."""
    torch.manual_seed(seed)
    arch_kwargs = arch_kwargs or {"depth": 2, "base_width": 8}
    model = build_model(arch, 4, len(LEGEND), **arch_kwargs)
    ckpt = Checkpoint(
        arch=arch,
        bands=list(BAND_NAMES),
        classes=LEGEND,
        mean=[600.0, 900.0, 800.0, 2800.0],
        std=[300.0, 400.0, 500.0, 1200.0],
        arch_kwargs=arch_kwargs,
    )
    return save_checkpoint(ckpt, model, path)


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("models") / "random_unet.safetensors")


@pytest.fixture(scope="session")
def scene_1000x700(tmp_path_factory) -> tuple[Path, Path]:
    """A scene whose size is not a multiple of the tile size, with a nodata wedge."""
    d = tmp_path_factory.mktemp("scenes")
    return write_scene(SceneSpec(1000, 700, seed=3), d / "scene.tif", d / "labels.tif")


def _local_client(n_workers: int):
    with (
        LocalCluster(n_workers=n_workers, threads_per_worker=1, dashboard_address=":0", host="127.0.0.1") as cluster,
        Client(cluster) as client,
    ):
        yield client


@pytest.fixture(scope="session")
def client2():
    yield from _local_client(2)


@pytest.fixture(scope="session")
def client1():
    yield from _local_client(1)


def run_cli_args(scene: Path, out: Path, *overrides: str) -> list[str]:
    """``geoseg run configs/demo.yaml`` arguments for one scene, with ``--set`` overrides."""
    args = ["run", "configs/demo.yaml", "--input", str(scene), "--out", str(out)]
    for item in overrides:
        args += ["--set", item]
    return args


def run_config(checkpoint: Path, inputs: list[Path], out: Path, *overrides: str):
    return load_config(
        None,
        [
            f"model.checkpoint={str(checkpoint)!r}",
            f"inputs={[str(p) for p in inputs]!r}",
            f"out={str(out)!r}",
            "tiling.tile_size=128",
            "tiling.overlap=16",
            *overrides,
        ],
    )


def predict_transitions(client, since: float) -> list[tuple[str, str, str]]:
    """(key, from, to) of every step-1 task's transition on the scheduler since ``since``."""
    return client.run_on_scheduler(
        lambda dask_scheduler: [
            (str(t.key), t.start, t.finish)
            for t in dask_scheduler.transition_log
            if t.timestamp >= since and str(t.key).startswith("predict-")
        ]
    )
