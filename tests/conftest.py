"""Shared fixtures: real GeoTIFFs on disk, real checkpoints, a real Dask LocalCluster, a real
S3-compatible server (moto's server mode) and Azure's storage emulator (Azurite) on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The S3 server's address and credentials go into the environment before anything imports
# geoseg (which derives GDAL's settings from it) or starts a Dask worker (which inherits it).
S3_PORT = _free_port()
S3_ENDPOINT = f"http://127.0.0.1:{S3_PORT}"
S3_SECRET = "geoseg-test-secret-5b1f"  # must never show up in a log, an error or a manifest
os.environ.update(
    AWS_ACCESS_KEY_ID="geoseg-test-key",
    AWS_SECRET_ACCESS_KEY=S3_SECRET,
    AWS_REGION="us-east-1",
    AWS_ENDPOINT_URL=S3_ENDPOINT,
)
# Azure the way Azure's tools name the emulator (geoseg derives GDAL's connection string from it)
AZURE_PORT = _free_port()
AZURE_ENDPOINT = f"http://127.0.0.1:{AZURE_PORT}"
os.environ.update(AZURE_STORAGE_USE_EMULATOR="true", AZURITE_BLOB_STORAGE_URL=AZURE_ENDPOINT)
# Google Cloud Storage's XML API is the one S3 speaks (paths /BUCKET/KEY, ListObjectsV2), and it
# is the API obstore's GCS client and GDAL's /vsigs/ use: gs:// goes to the same moto server.
# moto checks no signature, so this tests geoseg's gs:// wiring, not Google's auth. obstore
# sends a static OAuth token; GDAL has no option for one on /vsigs/ and reads anonymously.
GCS_TOKEN = "geoseg-test-gcs-token-9c2e"  # must never show up either
os.environ.update(GOOGLE_BASE_URL=S3_ENDPOINT, GOOGLE_BEARER_TOKEN=GCS_TOKEN, GS_NO_SIGN_REQUEST="YES")
AZURITE_VERSION = "3.37.0"
REPO_ROOT = Path(__file__).resolve().parent.parent

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from distributed import Client, LocalCluster  # noqa: E402

from geoseg.config import load_config  # noqa: E402
from geoseg.models import Checkpoint, build_model, save_checkpoint  # noqa: E402
from geoseg.synth import BAND_NAMES, SceneSpec, write_scene  # noqa: E402

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
    import dask

    from geoseg.cluster import SCHEDULER_DASK_CONFIG

    with dask.config.set(SCHEDULER_DASK_CONFIG):  # the scheduler geoseg's own LocalCluster has
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, dashboard_address=":0", host="127.0.0.1")
    with cluster, Client(cluster) as client:
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


def cli_config(scene: Path | str, out: Path | str, *overrides: str):
    """The config :func:`run_cli_args` gives ``geoseg run``: a test's setup run (or rerun) in its
    own process, without a command's start and end."""
    demo = Path(__file__).parent.parent / "configs" / "demo.yaml"
    return load_config(demo, list(overrides), {"inputs": [str(scene)], "out": str(out)})


def scene_arrays(folder: Path, name: str, seed: int) -> tuple[Path, np.ndarray, dict]:
    """A 400 x 300 synthetic scene without nodata written in ``folder``: the folder, its bands and its profile."""
    import rasterio

    path = write_scene(SceneSpec(400, 300, seed=seed, nodata_border=False), folder / name)[0]
    with rasterio.open(path) as src:
        return folder, src.read(), src.profile


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


@pytest.fixture(scope="session")
def s3_server_log(tmp_path_factory) -> Path:
    """Where moto's S3 server logs each request it answers (method, path and status)."""
    return tmp_path_factory.mktemp("moto") / "moto.log"


@pytest.fixture(scope="session")
def s3_server(s3_server_log):
    """moto's S3 server on 127.0.0.1 (the endpoint the environment names); yields its URL."""
    log = s3_server_log
    with open(log, "w") as sink:  # the server keeps its own handle
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(S3_PORT)],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(S3_ENDPOINT, timeout=2)
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError(f"moto_server did not start: {log.read_text()}") from None
            time.sleep(0.2)
    yield S3_ENDPOINT
    proc.terminate()
    proc.wait(timeout=30)


def _azurite_command() -> str:
    """Azurite's blob server, installed from the npm registry into .cache/ on first use."""
    found = shutil.which("azurite-blob")
    if found:
        return found
    local = REPO_ROOT / ".cache" / "azurite"
    command = local / "node_modules" / ".bin" / "azurite-blob"
    if not command.exists():
        if not shutil.which("npm"):
            pytest.skip("Azurite (Azure's storage emulator) needs node and npm")
        subprocess.run(
            ["npm", "install", "--prefix", str(local), "--no-audit", "--no-fund", f"azurite@{AZURITE_VERSION}"],
            check=True,
            capture_output=True,
            timeout=600,
        )
    return str(command)


@pytest.fixture(scope="session")
def azurite(tmp_path_factory):
    """Azurite's blob service on 127.0.0.1 (the endpoint the environment names); yields its URL."""
    log = tmp_path_factory.mktemp("azurite") / "azurite.log"
    command = [_azurite_command(), "--blobHost", "127.0.0.1", "--blobPort", str(AZURE_PORT)]
    with open(log, "w") as sink:
        proc = subprocess.Popen(
            [
                *command,
                "--inMemoryPersistence",
                "--extentMemoryLimit",
                "256",
                "--disableTelemetry",
                "--skipApiVersionCheck",
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    deadline = time.time() + 60
    while "successfully listens" not in log.read_text():
        if time.time() > deadline or proc.poll() is not None:
            raise RuntimeError(f"azurite did not start: {log.read_text()}")
        time.sleep(0.2)
    yield AZURE_ENDPOINT
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="session")
def container(azurite) -> str:
    """A fresh container on Azurite; yields ``az://NAME``."""
    from azure.storage.blob import BlobServiceClient

    name = f"geoseg-{os.getpid()}"
    BlobServiceClient.from_connection_string(os.environ["AZURE_STORAGE_CONNECTION_STRING"]).create_container(name)
    return f"az://{name}"


@pytest.fixture(scope="session")
def bucket(s3_server) -> str:
    """A fresh bucket on the loopback S3 server; yields ``s3://NAME``."""
    import boto3

    name = f"geoseg-{os.getpid()}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def gcs_bucket(s3_server) -> str:
    """A fresh bucket on the same server, addressed as Google Cloud Storage, whose objects anyone
    may read (GDAL reads them anonymously); yields ``gs://NAME``."""
    import json

    import boto3

    name = f"geosegcs{os.getpid()}"  # letters and digits: obstore percent-encodes the rest, moto keeps it so
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket=name)
    public = {"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{name}/*"}
    s3.put_bucket_policy(Bucket=name, Policy=json.dumps({"Version": "2012-10-17", "Statement": [public]}))
    return f"gs://{name}"
