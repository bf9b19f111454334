"""Scenes, checkpoint and outputs on an S3-compatible store (moto's server on 127.0.0.1) and on
Azure Blob Storage (Azurite on 127.0.0.1), with no disk shared between the workers: the results
must be those of the same run on local disk."""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import json
import logging
import os
import random
import re
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import boto3
import geopandas as gpd
import numpy as np
import pytest
import rasterio.shutil
import rioxarray  # noqa: F401  (registers .rio)
import shapely
import xarray as xr
from conftest import GCS_TOKEN, S3_ENDPOINT, S3_SECRET, cli_config, run_cli_args, run_config
from distributed import Client
from test_distributed import _spawn, _start_scheduler, _stop

from geoseg import storage
from geoseg.jobs import RunError, run

REPO = Path(__file__).parent.parent
BLOCK = "output.block_size=256"


def put(path: Path, url: str, public: bool = False) -> str:
    """Upload a local file as the object ``url`` (readable anonymously over HTTP if ``public``)."""
    bucket, key = url.removeprefix("s3://").split("/", 1)
    extra = {"ACL": "public-read"} if public else {}
    boto3.client("s3", endpoint_url=S3_ENDPOINT).put_object(Bucket=bucket, Key=key, Body=path.read_bytes(), **extra)
    return url


@pytest.fixture(scope="module")
def remote(bucket, scene_1000x700, random_checkpoint):
    """The test scene (a COG) and the checkpoint in the bucket."""
    cog = scene_1000x700[0].with_name("scene_cog.tif")
    rasterio.shutil.copy(scene_1000x700[0], cog, driver="COG")
    return {
        "scene": put(scene_1000x700[0], f"{bucket}/scenes/scene.tif", public=True),
        "cog": put(cog, f"{bucket}/scenes/cog/scene.tif"),
        "checkpoint": put(random_checkpoint, f"{bucket}/models/random.safetensors"),
        "bucket": bucket,
    }


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory, random_checkpoint, scene_1000x700, client2):
    out = tmp_path_factory.mktemp("local_ref")
    assert run(run_config(random_checkpoint, [scene_1000x700[0]], out, BLOCK), client2).ok
    return out


def mosaic_of(out: str) -> xr.Dataset:
    return xr.open_zarr(storage.join(out, "mosaic.zarr"), storage_options=storage.storage_options(out))


def area_per_class(gdf: gpd.GeoDataFrame) -> dict[int, float]:
    return {int(k): round(float(v), 3) for k, v in gdf.groupby("class_id")["area_m2"].sum().items()}


def assert_same_as_local(out: str, local_reference: Path) -> None:
    """The mosaic in the store (opened through zarr's store over obstore) is bitwise the local
    run's, with its CRS and transform; its polygons have the same count and area per class."""
    got = xr.open_zarr(storage.zarr_store(f"{out}/mosaic.zarr", read_only=True))
    want = xr.open_zarr(local_reference / "mosaic.zarr")
    assert got.rio.crs == want.rio.crs and got.rio.transform() == want.rio.transform()
    np.testing.assert_array_equal(got["classes"].values, want["classes"].values)
    np.testing.assert_array_equal(got["confidence"].values, want["confidence"].values)
    with storage.local_copy(f"{out}/polygons.gpkg") as gpkg:
        polygons = gpd.read_file(gpkg)
    reference = gpd.read_file(local_reference / "polygons.gpkg")
    assert len(polygons) == len(reference) > 0 and area_per_class(polygons) == area_per_class(reference)


@pytest.fixture
def isolated_workers(tmp_path):
    """A `dask scheduler` and two `dask worker` processes, each worker started in an empty folder
    of its own, with a local directory and a temporary folder of its own: no disk in common."""
    scheduler, sched_file = _start_scheduler(tmp_path)
    procs = [scheduler]
    for i in range(2):
        home = tmp_path / f"worker{i}"
        (home / "tmp").mkdir(parents=True)
        env_args = ["--local-directory", str(home / "dask"), "--nthreads", "1", "--no-dashboard"]
        procs.append(
            _spawn(
                "worker",
                "--scheduler-file",
                str(sched_file),
                "--host",
                "127.0.0.1",
                "--name",
                f"w{i}",
                *env_args,
                log=tmp_path / f"worker{i}.log",
                cwd=home,
                env={"TMPDIR": str(home / "tmp")},
            )  # fmt: skip
        )
    with Client(scheduler_file=str(sched_file), timeout="30s") as client:
        client.wait_for_workers(2, timeout=60)
        address = client.scheduler.address
    yield address
    _stop(procs)


def test_a_run_with_only_s3_urls_on_isolated_workers_equals_the_local_run(
    isolated_workers, remote, local_reference, caplog, s3_server_log
):
    caplog.set_level(logging.INFO)  # the run's own lines too, not only its warnings
    logged = len(s3_server_log.read_text(errors="replace").splitlines())
    out = f"{remote['bucket']}/runs/distributed"
    cfg = run_config(
        Path("unused"), [], Path("unused"), BLOCK, f"cluster.address={isolated_workers}",
        f"model.checkpoint={remote['checkpoint']}", f"inputs=[{remote['cog']!r}]", f"out={out!r}",
    )  # fmt: skip
    result = run(cfg)
    assert result.ok, (result.failed_scenes, result.failed_blocks)
    assert_same_as_local(out, local_reference)
    got, want = mosaic_of(out), xr.open_zarr(local_reference / "mosaic.zarr")  # as users open it: fsspec
    assert got.rio.crs == want.rio.crs
    np.testing.assert_array_equal(got["classes"].values, want["classes"].values)
    manifest = json.loads(storage.read_text(f"{out}/manifest.json"))
    assert manifest["status"] == "finished" and manifest["inputs"] == [remote["cog"]]
    assert manifest["scenes"][0]["path"] == remote["cog"] and manifest["model"]["checkpoint"] == remote["checkpoint"]
    assert storage.exists(f"{out}/quicklook.png")
    assert not storage.list_files(f"{out}/.geoseg/partials/")  # read by the neighbours, then removed
    # each block's step 1 was saved, and its neighbours on the other worker had it from Dask:
    # no request fetched a saved pack back
    requests = s3_server_log.read_text(errors="replace").splitlines()[logged:]
    packs = [line for line in requests if "/runs/distributed/.geoseg/partials/" in line and "step1-" in line]
    assert len(packs) == len(manifest["blocks"]) and all("PUT /" in line for line in packs), packs
    assert "polygons ->" in caplog.text  # the log was captured: what it lacks means something
    assert S3_SECRET not in json.dumps(manifest) and S3_SECRET not in caplog.text


def test_a_scene_over_plain_http_range_requests(tmp_path, remote, local_reference, random_checkpoint, client2):
    url = f"{S3_ENDPOINT}/{remote['scene'].removeprefix('s3://')}"
    result = run(run_config(random_checkpoint, [url], tmp_path / "out", BLOCK, "output.polygons=false"), client2)
    assert result.ok
    np.testing.assert_array_equal(
        xr.open_zarr(tmp_path / "out" / "mosaic.zarr")["classes"].values,
        xr.open_zarr(local_reference / "mosaic.zarr")["classes"].values,
    )
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["scenes"][0]["path"] == url


class GetOnlyHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files by ranged GETs and refuses HEAD, as a presigned GET URL does (its signature
    covers the method)."""

    def do_HEAD(self) -> None:  # noqa: N802
        self.send_response(403)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802
        data = Path(self.translate_path(self.path.split("?")[0])).read_bytes()
        asked = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if asked is None:
            self.send_response(200)
            first, last = 0, len(data) - 1
        else:
            first, last = int(asked[1]), min(int(asked[2] or len(data) - 1), len(data) - 1)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {first}-{last}/{len(data)}")
        self.send_header("Content-Length", str(last - first + 1))
        self.end_headers()
        self.wfile.write(data[first : last + 1])

    def log_message(self, *args: object) -> None:
        pass


def test_a_url_whose_server_refuses_head_is_read_by_ranged_gets(remote, scene_1000x700):
    from functools import partial

    from geoseg.scenes import open_dataset, open_scene

    folder = scene_1000x700[0].parent
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(GetOnlyHandler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/scene_cog.tif"
        # GDAL knows AWS's signature and reads such a URL by GETs itself; an unsigned URL (or one
        # signed otherwise, as Google's V4 signatures are) is read by GETs too
        with rasterio.open(scene_1000x700[0]) as src:
            want = src.read(window=rasterio.windows.Window(600, 300, 64, 32))
        for url in (f"{base}?X-Amz-Signature=0123abcd&X-Amz-Expires=60", base, f"{base}?X-Goog-Signature=0abc"):
            assert storage.exists(url)
            scene = open_scene(url, expected_bands=4)
            assert scene.width == 1000
            with open_dataset(scene) as src:
                np.testing.assert_array_equal(src.read(window=rasterio.windows.Window(600, 300, 64, 32)), want)
    finally:
        server.shutdown()


def test_a_signed_urls_query_stays_out_of_the_manifest_and_the_log(tmp_path, remote, client1):
    """A scene given as a signed URL (its signature in the query) is read, and the signature is
    in neither the manifest nor the log nor an error line."""
    url = f"{S3_ENDPOINT}/{remote['scene'].removeprefix('s3://')}?sig=s3cr3tSIGNATURE&se=2030"
    checkpoint = f"{S3_ENDPOINT}/{remote['bucket'].removeprefix('s3://')}/models/none.pt?sig=s3cr3tSIGNATURE"
    out = tmp_path / "out"
    args = [sys.executable, "-m", "geoseg", *run_cli_args(url, out, BLOCK, "output.polygons=false")]  # type: ignore[arg-type]
    res = subprocess.run([*args, "--set", "cluster.n_workers=1"], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    manifest = (out / "manifest.json").read_text()
    assert json.loads(manifest)["scenes"][0]["path"].endswith("/scenes/scene.tif?***")
    assert "s3cr3tSIGNATURE" not in manifest + res.stdout + res.stderr
    # nor in any file the run left (the blocks' records name their scenes), and the same scene
    # signed again resumes the run: its blocks are reused
    assert not [p for p in out.rglob("*") if p.is_file() and b"s3cr3t" in p.read_bytes()]
    resigned = url.replace("s3cr3tSIGNATURE", "an0therSIGNATURE")
    assert run(cli_config(resigned, out, BLOCK, "output.polygons=false"), client1).ok
    summary = json.loads((out / "manifest.json").read_text())["summary"]
    assert summary["computed"] == 0 and summary["reused"] > 0, summary
    res = subprocess.run([*args, "--set", f"model.checkpoint={checkpoint}"], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 2 and "none.pt?***" in res.stderr and "s3cr3tSIGNATURE" not in res.stderr
    # one that is fetched but is no checkpoint: its local copy is named without the signature,
    # and the error names the URL as given
    (tmp_path / "garbage.safetensors").write_bytes(b"not a checkpoint")
    garbage = put(tmp_path / "garbage.safetensors", f"{remote['bucket']}/models/garbage.safetensors", public=True)
    signed = f"{S3_ENDPOINT}/{garbage.removeprefix('s3://')}?sv=2030&sig=s3cr3tSIGNATURE"
    res = subprocess.run([*args, "--set", f"model.checkpoint={signed}"], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 2 and "models/garbage.safetensors?***: cannot read checkpoint" in res.stderr, res.stderr
    assert "s3cr3tSIGNATURE" not in res.stdout + res.stderr
    cache = Path(tempfile.gettempdir()) / f"geoseg-cache-{os.getuid()}"
    assert cache.stat().st_mode & 0o777 == 0o700
    copies = [p.name for p in cache.iterdir() if p.name.endswith("-garbage.safetensors")]
    assert copies and not any("s3cr3t" in name for name in copies)


def test_a_client_killed_at_a_random_block_on_s3_resumes_to_the_same_mosaic(remote, local_reference, client1, caplog):
    out = f"{remote['bucket']}/runs/killed"
    settings = [f"model.checkpoint={remote['checkpoint']}", "output.block_size=128", "tiling.tile_size=128"]
    settings += ["tiling.overlap=16", "cluster.n_workers=1"]
    args = [sys.executable, "-m", "geoseg", *run_cli_args(remote["cog"], out, *settings)]  # type: ignore[arg-type]
    proc = subprocess.Popen(
        args, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    kill_after = random.Random(7).randint(3, 24)
    deadline = time.time() + 180
    while len(storage.list_files(f"{out}/.geoseg/blocks/")) < kill_after and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = len(storage.list_files(f"{out}/.geoseg/blocks/"))
    assert committed >= kill_after
    with caplog.at_level(logging.INFO):  # the same command again, in this process
        assert run(cli_config(remote["cog"], out, *settings), client1).ok
    manifest = json.loads(storage.read_text(f"{out}/manifest.json"))
    assert manifest["status"] == "finished" and manifest["summary"]["reused"] >= committed
    assert manifest["summary"]["computed"] == 48 - manifest["summary"]["reused"]
    # block 128 against the reference's 256: partition invariance holds on the store too
    np.testing.assert_array_equal(
        mosaic_of(out)["classes"].values, xr.open_zarr(local_reference / "mosaic.zarr")["classes"].values
    )
    for level in ("overviews/2", "overviews/4"):  # every chunk written, after the kill too
        got = xr.open_zarr(storage.zarr_store(f"{out}/mosaic.zarr", read_only=True), group=level)
        want = xr.open_zarr(local_reference / "mosaic.zarr", group=level)
        np.testing.assert_array_equal(got["classes"].values, want["classes"].values)
    assert "reused" in caplog.text and S3_SECRET not in caplog.text


def test_bad_remote_inputs_are_named_and_the_good_scene_completes(
    tmp_path, remote, scene_1000x700, random_checkpoint, client2, caplog
):
    caplog.set_level(logging.INFO)
    bucket = remote["bucket"]
    text = tmp_path / "notes.tif"
    text.write_text("not a raster\n")
    cog = scene_1000x700[0].with_name("scene_cog.tif")
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(cog.read_bytes()[: int(cog.stat().st_size * 0.6)])
    # its header may be asked (HEAD), its bytes not (GET): on S3, an object under a KMS key the
    # reader may not use
    s3 = boto3.client("s3", endpoint_url=S3_ENDPOINT)
    locked = f"locked-{os.getpid()}"
    s3.create_bucket(Bucket=locked)
    s3.put_object(Bucket=locked, Key="scene.tif", Body=cog.read_bytes())
    s3.put_object(Bucket=locked, Key="public.tif", Body=cog.read_bytes(), ACL="public-read")
    deny = {"Effect": "Deny", "Principal": "*", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{locked}/*"}
    s3.put_bucket_policy(Bucket=locked, Policy=json.dumps({"Version": "2012-10-17", "Statement": [deny]}))
    bad = {
        f"{bucket}/scenes/missing.tif": "no such object",
        put(text, f"{bucket}/bad/notes.tif"): "not a readable raster",
        put(truncated, f"{bucket}/bad/truncated.tif"): "cannot read pixel data",
        f"{S3_ENDPOINT}/{bucket.removeprefix('s3://')}/scenes/cog/scene.tif": "access denied",  # not public
        f"s3://{locked}/scene.tif": "access denied (",
        f"{S3_ENDPOINT}/{locked}/public.tif": "access denied",  # over plain HTTP: GDAL's message has no status
    }
    out = f"{bucket}/runs/bad-inputs"
    cfg = run_config(random_checkpoint, [], Path("unused"), BLOCK, f"inputs={[remote['cog'], *bad]!r}", f"out={out!r}")
    result = run(cfg, client2)
    assert set(result.failed_scenes) == set(bad)
    for url, reason in bad.items():
        assert reason in result.failed_scenes[url], (url, result.failed_scenes[url])
    assert not result.failed_blocks
    manifest = json.loads(storage.read_text(f"{out}/manifest.json"))
    assert manifest["status"] == "finished"
    assert {s["path"] for s in manifest["scenes"] if s["status"] == "failed"} == set(bad)
    assert all(url in caplog.text for url in bad)  # each named in the log too, which is captured
    assert S3_SECRET not in json.dumps(manifest) and S3_SECRET not in caplog.text


def test_a_store_that_refuses_the_chunks_fails_the_blocks_with_one_line_each(remote, random_checkpoint, client2):
    s3 = boto3.client("s3", endpoint_url=S3_ENDPOINT)
    refusing = f"refusing-{os.getpid()}"
    s3.create_bucket(Bucket=refusing)
    chunks = f"arn:aws:s3:::{refusing}/run/mosaic.zarr/classes/c/*"
    deny = {"Effect": "Deny", "Principal": "*", "Action": "s3:PutObject", "Resource": chunks}
    s3.put_bucket_policy(Bucket=refusing, Policy=json.dumps({"Version": "2012-10-17", "Statement": [deny]}))
    out = f"s3://{refusing}/run"
    cfg = run_config(random_checkpoint, [], Path("unused"), BLOCK, f"inputs=[{remote['cog']!r}]", f"out={out!r}")
    result = run(cfg, client2)
    assert result.failed_blocks and not result.ok
    manifest = json.loads(storage.read_text(f"{out}/manifest.json"))
    errors = [b["error"] for b in manifest["blocks"].values() if b["status"] == "failed"]
    assert len(errors) == len(result.failed_blocks)
    for error in errors:  # not the store client's page of debug output
        assert "\n" not in error and "mosaic.zarr/classes/c/" in error and "403" in error, error


def test_an_unreachable_endpoint_is_one_line_naming_the_url(tmp_path, remote):
    with _closed_port() as port:
        endpoint = f"http://127.0.0.1:{port}"
        env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "PYTHONWARNINGS": "ignore"}
        env.pop("AWS_S3_ENDPOINT", None)  # derived from the endpoint at start-up
        args = [sys.executable, "-m", "geoseg", *run_cli_args(remote["cog"], tmp_path / "out", BLOCK)]
        res = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
        run_on_store = f"{remote['bucket']}/runs/finished"
        exports = [
            subprocess.run(
                [sys.executable, "-m", "geoseg", *command], cwd=REPO, capture_output=True, text=True, env=env
            )
            for command in (["export", run_on_store], ["vectorize", run_on_store])
        ]
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and remote["cog"] in lines[0] and "endpoint unreachable" in lines[0], res.stderr
    assert S3_SECRET not in res.stdout + res.stderr
    for done in exports:  # not "not a geoseg run": the store could not be asked
        assert (
            done.returncode == 2
            and done.stderr.strip() == f"error: {run_on_store}/manifest.json: endpoint unreachable ({endpoint})"
        )


def test_a_worker_that_cannot_reach_the_store_stops_the_run_before_any_block(tmp_path, remote, random_checkpoint):
    """A worker started with another endpoint (or no credentials) would fail every block it got;
    the run says which worker and why, at the start, and nothing is computed."""
    scheduler, sched_file = _start_scheduler(tmp_path)
    with _closed_port() as port:
        env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_S3_ENDPOINT": ""}
        args = ["--scheduler-file", str(sched_file), "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1"]
        worker = _spawn("worker", *args, log=tmp_path / "worker.log", env=env)
        try:
            with Client(scheduler_file=str(sched_file), timeout="30s") as client:
                client.wait_for_workers(1, timeout=60)
                address = client.scheduler.address
            out = f"{remote['bucket']}/runs/blind-worker"
            cfg = run_config(random_checkpoint, [remote["cog"]], Path("unused"), BLOCK, f"out={out!r}")
            blind = (
                r"1 of 1 workers cannot use .*: worker tcp:.* finds endpoint unreachable \(http://127.0.0.1:\d+\) at "
            )
            with pytest.raises(RunError, match=blind + ".*lease.json"):
                run(cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update={"address": address})}))
        finally:
            _stop([scheduler, worker])
    assert not storage.list_files(f"{out}/.geoseg/blocks/")


def test_a_key_with_404_in_it_on_an_unreachable_endpoint_is_not_a_missing_object(remote):
    """A resume asks whether OUT's state exists: an error taken for "no such object" would start
    the run afresh and throw away its committed blocks."""
    loc = f"{remote['bucket']}/runs/20240404/.geoseg/fingerprint"
    # and an input that cannot be listed then stops the run: without it, the rerun after the
    # outage would find another input list and be refused
    pattern = f"{remote['bucket']}/stac/*.json"
    code = (
        "from geoseg import storage\nfrom geoseg.catalog import expand_inputs\n"
        f"try:\n    print(storage.exists({loc!r}))\nexcept storage.StorageError as e:\n    print(e)\n"
        f"try:\n    print(expand_inputs([{pattern!r}], empty={{}}))\nexcept Exception as e:\n"
        "    print(type(e).__name__, e)"
    )
    with _closed_port() as port:
        env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "PYTHONWARNINGS": "ignore"}
        env.pop("AWS_S3_ENDPOINT", None)
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    lines = res.stdout.strip().splitlines()
    assert lines[0] == f"{loc}: endpoint unreachable (http://127.0.0.1:{port})", res.stderr
    assert lines[1].startswith("RunError ") and lines[1].endswith(f": endpoint unreachable (http://127.0.0.1:{port})")


def test_an_http_output_is_refused_and_an_s3_out_is_not_a_local_folder(tmp_path, remote, random_checkpoint):
    from geoseg.runstate import RunError

    with pytest.raises(RunError, match="read-only"):
        run(run_config(random_checkpoint, [remote["cog"]], Path("unused"), f"out={S3_ENDPOINT + '/x/run'!r}"))
    assert not Path("s3:").exists() and not (REPO / "s3:").exists()
    # an object as OUT, as a file is on a disk: its name would become a prefix beside it
    with pytest.raises(RunError, match=rf"^{re.escape(remote['cog'])}: the output exists and is not a folder$"):
        run(run_config(random_checkpoint, [remote["cog"]], Path("unused"), f"out={remote['cog']!r}"))
    assert storage.list_files(remote["cog"] + "/") == []


def test_another_trainers_checkpoint_at_a_url_finds_its_sidecar_beside_it(tmp_path, remote, random_checkpoint):
    """A plain state_dict on the store with ``NAME.yaml`` beside it loads as it does from disk;
    without the sidecar, one line names both URLs."""
    import torch
    import yaml

    from geoseg.models.checkpoint import CheckpointError, load_checkpoint

    native = load_checkpoint(random_checkpoint)
    torch.save(native.build().state_dict(), tmp_path / "weights.pt")
    sidecar = {
        "bands": native.bands,
        "classes": [c["name"] for c in native.classes],
        "mean": native.mean,
        "std": native.std,
        "arch": native.arch,
        "arch_kwargs": native.arch_kwargs,
    }
    (tmp_path / "weights.yaml").write_text(yaml.safe_dump(sidecar))
    url = put(tmp_path / "weights.pt", f"{remote['bucket']}/models/theirs/weights.pt")
    put(tmp_path / "weights.yaml", f"{remote['bucket']}/models/theirs/weights.yaml")
    local, fetched = load_checkpoint(tmp_path / "weights.pt"), load_checkpoint(url)
    assert fetched.path == url and fetched.sha256 == local.sha256
    assert fetched.classes == local.classes and fetched.bands == native.bands
    for name, tensor in local.state_dict.items():
        assert torch.equal(fetched.state_dict[name], tensor)
    lonely = put(tmp_path / "weights.pt", f"{remote['bucket']}/models/lonely/weights.pt")
    with pytest.raises(CheckpointError, match=r"lonely/weights.pt: not a geoseg checkpoint, and its sidecar s3://"):
        load_checkpoint(lonely)


@contextlib.contextmanager
def _closed_port() -> Iterator[int]:
    """A port bound but not listening (connections are refused), held for the test so that no
    other server takes it; one with "403" in it where free: an HTTP status must not be read
    from the URL's port."""
    import socket

    with socket.socket() as s:
        for port in [*range(40300, 40400), 0]:
            try:
                s.bind(("127.0.0.1", port))
                break
            except OSError:
                continue
        yield s.getsockname()[1]


def test_export_and_change_of_runs_on_s3_write_their_layers_to_the_store(remote, local_reference, client2):
    from geoseg.config import ChangeConfig
    from geoseg.jobs import export_run, run_change, run_config_of

    out = f"{remote['bucket']}/runs/for-export"
    cfg = run_config(
        Path("unused"), [], Path("unused"), BLOCK, f"model.checkpoint={remote['checkpoint']}",
        f"inputs=[{remote['cog']!r}]", f"out={out!r}",
    )  # fmt: skip
    assert run(cfg, client2).ok
    result = export_run(out, run_config_of(out, ["vector.formats=['gpkg', 'parquet', 'fgb']"]), client2)
    for name in ("classes.tif", "polygons.gpkg", "polygons.parquet", "polygons.fgb", "classes.qml", "report.json"):
        assert storage.exists(f"{out}/{name}"), name
    assert result.files["cog"] == f"{out}/classes.tif"
    with storage.local_copy(f"{out}/classes.tif") as cog, rasterio.open(cog) as src:
        np.testing.assert_array_equal(src.read(1), xr.open_zarr(local_reference / "mosaic.zarr")["classes"].values)
    with storage.local_copy(f"{out}/polygons.parquet") as parquet:
        assert len(gpd.read_parquet(parquet)) == len(gpd.read_file(local_reference / "polygons.gpkg"))
    change_out = f"{remote['bucket']}/runs/change"
    changed = run_change(str(local_reference), out, change_out, ChangeConfig(), client2)
    assert int(changed.matrix.sum() - np.trace(changed.matrix)) == 0  # the same classes on both dates
    assert storage.exists(f"{change_out}/change.zarr/zarr.json") and storage.exists(f"{change_out}/transitions.png")
    with storage.local_copy(f"{change_out}/change_polygons.gpkg") as gpkg:
        empty = gpd.read_file(gpkg)
    assert len(empty) == 0 and empty.crs.to_epsg() == 32633  # no change, but the layer says where it is
    item = json.loads(storage.read_text(f"{out}/item.json"))  # the run's item, with what export added
    assert {"mosaic.zarr", "classes.tif", "polygons.parquet", "report.json"} <= set(item["assets"])
    for asset in item["assets"].values():  # a Zarr store is a prefix: its root metadata stands for it
        name = asset["href"][2:]
        assert storage.exists(f"{out}/{name}/zarr.json" if name.endswith(".zarr") else f"{out}/{name}"), name
    # and the run is on a map straight from the bucket
    import io
    import threading
    import urllib.request

    from PIL import Image

    from geoseg.maptiles import WEB_MERCATOR
    from geoseg.view import ViewServer

    server = ViewServer(out, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        tilejson = json.loads(urllib.request.urlopen(f"{server.url}/classes/tilejson.json", timeout=30).read())
        west, south, east, north = tilejson["bounds"]
        t = WEB_MERCATOR.tile((west + east) / 2, (south + north) / 2, tilejson["maxzoom"])
        png = urllib.request.urlopen(f"{server.url}/classes/tiles/{t.z}/{t.x}/{t.y}.png", timeout=30).read()
        assert (np.asarray(Image.open(io.BytesIO(png)))[..., 3] == 255).mean() > 0.5
        legend = json.loads(urllib.request.urlopen(f"{server.url}/legend.json", timeout=30).read())
        assert sum(row["km2"] for row in legend) > 0  # from the report in the bucket
    finally:
        server.shutdown()
        server.server_close()
    # `geoseg view` of the change in the bucket (a Zarr store there is a prefix, not an object)
    proc = subprocess.Popen(
        [sys.executable, "-m", "geoseg", "view", change_out, "--port", "0"], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        url = proc.stdout.readline().split("geoseg view: ", 1)[1].split()[0]
        page = urllib.request.urlopen(url, timeout=30).read().decode()
        described = json.loads(urllib.request.urlopen(f"{url}run.json", timeout=30).read())
        assert described["kind"] == "change" and described["name"] == "change" and "<html" in page.lower()
    finally:
        proc.kill()
        proc.wait()


def test_a_stac_collection_in_the_bucket_names_its_cogs_relatively_and_globs_stay_in_their_folder(remote):
    from geoseg.catalog import ItemOrigin, expand_inputs

    bucket = remote["bucket"]
    items = {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "id": "a", "assets": {"image": {"href": "../scenes/cog/scene.tif"}}},
            {"type": "Feature", "id": "b", "assets": {"image": {"href": "/scenes/scene.tif"}}},
        ],
    }
    storage.write_text(f"{bucket}/stac/items.json", json.dumps(items))
    assert expand_inputs([f"{bucket}/stac/items.json"]) == [remote["cog"], remote["scene"]]
    assert expand_inputs([f"{bucket}/scenes/*.tif"]) == [remote["scene"]]  # not scenes/cog/scene.tif
    assert expand_inputs([f"{bucket}/scenes/"]) == [remote["cog"], remote["scene"]]  # a prefix: at any depth
    empty: dict[str, str] = {}
    assert expand_inputs([f"{bucket}/nothing/*.tif", f"{bucket}/nothing/"], empty=empty) == []
    assert set(empty.values()) == {"pattern that matches no file", "prefix with no .tif/.tiff object"}
    # a signed URL of a dated collection: the items' times reach the scenes (mosaic_rule latest);
    # a document that cannot be read is one bad input, not the end of the run
    hrefs = ["../scenes/cog/scene.tif", "../scenes/scene.tif"]  # over http, "/" is the host's root
    dated = {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "id": f"d{k}", "properties": {"datetime": f"2026-0{k + 5}-01T10:00:00Z"},
             "assets": {"image": {"href": href}}}
            for k, href in enumerate(hrefs)
        ],
    }  # fmt: skip
    public = bucket.removeprefix("s3://")
    boto3.client("s3", endpoint_url=S3_ENDPOINT).put_object(
        Bucket=public.split("/")[0], Key="stac/dated.json", Body=json.dumps(dated).encode(), ACL="public-read"
    )
    signed = f"{S3_ENDPOINT}/{public}/stac/dated.json?sv=2030&sig=abc"
    origins: dict[str, ItemOrigin] = {}
    missing = f"{bucket}/stac/missing.json"
    found = expand_inputs([signed, missing], empty=empty, origins=origins)
    assert found == [f"{S3_ENDPOINT}/{public}/scenes/cog/scene.tif", f"{S3_ENDPOINT}/{public}/scenes/scene.tif"]
    assert {loc: origin.acquired for loc, origin in origins.items()} == {
        found[0]: "2026-05-01T10:00:00Z",
        found[1]: "2026-06-01T10:00:00Z",
    }
    assert empty[missing] == "no such object"
    # a pattern of STAC documents gives their scenes; a listing that fails is one bad input
    stac_origins: dict[str, ItemOrigin] = {}
    catalog = {"type": "Catalog", "id": "c", "stac_version": "1.1.0", "description": "the items", "links": []}
    storage.write_text(f"{bucket}/stac/catalog.json", json.dumps(catalog))  # beside the items: no scene
    by_pattern = expand_inputs([f"{bucket}/stac/*.json"], empty=empty, origins=stac_origins)
    assert by_pattern == [f"{bucket}/scenes/cog/scene.tif", f"{bucket}/scenes/scene.tif"]  # each once
    assert sorted(o.acquired for o in stac_origins.values()) == ["2026-05-01T10:00:00Z", "2026-06-01T10:00:00Z"]
    assert f"{bucket}/stac/catalog.json" not in empty
    empty.clear()
    assert expand_inputs(["s3://no-such-bucket-here/*.tif", remote["scene"]], empty=empty) == [remote["scene"]]
    assert empty == {"s3://no-such-bucket-here/*.tif": "s3://no-such-bucket-here/: no such bucket"}


def test_keys_with_hash_question_mark_percent_and_space_are_read_and_written_as_named(remote, scene_1000x700):
    """In an object key "#", "?", "%41" and " " are characters: a scene listed under such a key
    opens, and an object is written under its own name (a "#" once cut the key there, and every
    output of an OUT with one landed on one object)."""
    from geoseg.catalog import expand_inputs
    from geoseg.scenes import open_scene

    odd = f"{remote['bucket']}/odd keys/scene #1?v=2 %41.tif"
    put(scene_1000x700[0], odd)
    assert expand_inputs([f"{remote['bucket']}/odd keys/"]) == [odd]
    assert open_scene(odd, expected_bands=4).width == 1000  # through GDAL's /vsis3/
    public = remote["bucket"].removeprefix("s3://")
    storage.write_text(f"{remote['bucket']}/runs/a#b?c %41/manifest.json", "{}")
    listing = boto3.client("s3", endpoint_url=S3_ENDPOINT).list_objects_v2(Bucket=public, Prefix="runs/a#b")
    assert [o["Key"] for o in listing["Contents"]] == ["runs/a#b?c %41/manifest.json"]  # as named, on the server
    # over plain HTTP the path is percent-encoded once, as a browser sends it
    spaced = put(scene_1000x700[0], f"{remote['bucket']}/odd keys/my scene.tif", public=True)
    http = f"{S3_ENDPOINT}/{spaced.removeprefix('s3://').replace(' ', '%20')}"
    assert storage.exists(http) and storage.read_bytes(http) == scene_1000x700[0].read_bytes()
    assert open_scene(http, expected_bands=4).width == 1000


@pytest.mark.parametrize("store", ["bucket", "gcs_bucket", "container"])
def test_an_out_with_hash_question_mark_percent_and_space_keeps_every_object_apart(store, request):
    import zarr

    out = f"{request.getfixturevalue(store)}/runs/a#b?c %41"
    storage.write_text(f"{out}/manifest.json", "{}")
    storage.write_text(f"{out}/.geoseg/lease.json", "[]")
    group = zarr.open_group(storage.zarr_store(f"{out}/mosaic.zarr"), mode="w")
    group.create_array("classes", shape=(4, 4), dtype="uint8", fill_value=255)[:] = np.arange(16).reshape(4, 4)
    names = {loc.removeprefix(f"{out}/") for loc in storage.list_files(f"{out}/")}
    assert {"manifest.json", ".geoseg/lease.json", "mosaic.zarr/zarr.json", "mosaic.zarr/classes/zarr.json"} <= names
    assert storage.read_text(f"{out}/.geoseg/lease.json") == "[]" and storage.is_dir(out)
    classes = zarr.open_group(storage.zarr_store(f"{out}/mosaic.zarr", read_only=True), mode="r")["classes"]
    np.testing.assert_array_equal(classes[:], np.arange(16).reshape(4, 4))


def test_local_sidecar_files_are_still_read(tmp_path):
    """GDAL's settings for network opens (no directory listing) must not hide a local file's sidecars."""
    path = tmp_path / "plain.tif"
    with warnings.catch_warnings():  # written without a transform: the .tfw gives it
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        dst = rasterio.open(path, "w", driver="GTiff", width=8, height=8, count=1, dtype="uint8")
    with dst:
        dst.write(np.ones((1, 8, 8), np.uint8))
    path.with_suffix(".tfw").write_text("10\n0\n0\n-10\n500005\n5199995\n")
    with storage.open_raster(path) as src:
        assert (src.transform.c, src.transform.f) == (500000.0, 5200000.0)


@pytest.mark.parametrize("store", ["bucket", "container"])
def test_the_lease_on_a_store_refuses_a_second_run_and_only_one_taker_replaces_a_stale_one(store, request):
    from dataclasses import asdict, replace

    from geoseg.runstate import Lease, RunError, read_lease

    out = f"{request.getfixturevalue(store)}/runs/leased"
    with Lease(out, "first", heartbeat_s=0.1):
        with pytest.raises(RunError, match="is in use by another geoseg run"):
            Lease(out, "second").acquire()
        first = read_lease(out).heartbeat
        time.sleep(0.5)
        assert read_lease(out).heartbeat > first  # the heartbeat renews it on the store
        holder = read_lease(out)
    assert read_lease(out) is None
    stale = replace(holder, run_id="gone", node="elsewhere:1", heartbeat=time.time() - 3600)
    storage.write_text(f"{out}/.geoseg/lease.json", json.dumps(asdict(stale)))
    a, b = Lease(out, "a"), Lease(out, "b")
    assert a._replace_stale(stale)  # a overwrites the version it judged gone ...
    assert not b._replace_stale(stale)  # ... b, judging the same, finds it changed
    assert read_lease(out).run_id == "a"
    b_lease = Lease(out, "b")
    with pytest.raises(RunError, match="is in use"):  # a's lease is fresh: b is refused
        b_lease.acquire()


def opened_with_fsspec(loc: str) -> str:
    """The CRS and a digest of the classes of the mosaic at ``loc``, as xarray opens it, with
    :func:`geoseg.storage.storage_options` (in a process of its own: adlfs's clients complain
    at the exit of the process that made them)."""
    code = (
        "import hashlib, sys, xarray as xr, rioxarray\n"
        "from geoseg import storage\n"
        "options = storage.storage_options(sys.argv[1])\n"
        "ds = xr.open_zarr(sys.argv[1], **({'storage_options': options} if options else {}))\n"
        "print(ds.rio.crs.to_epsg(), hashlib.sha256(ds['classes'].values.tobytes()).hexdigest())\n"
    )
    done = subprocess.run([sys.executable, "-c", code, loc], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _secret_of(store: str) -> str:
    if store == "container":
        return os.environ["AZURE_STORAGE_CONNECTION_STRING"].split("AccountKey=")[1].split(";")[0]
    return GCS_TOKEN


@pytest.mark.parametrize(("store", "gdal_scheme"), [("container", "abfs"), ("gcs_bucket", "gcs")])
def test_a_run_on_azure_blob_storage_and_on_google_cloud_storage_equals_the_local_run(
    store, gdal_scheme, request, scene_1000x700, random_checkpoint, local_reference, client2, caplog
):
    """az:// (Azurite) or gs:// (the XML API) scene, checkpoint and OUT; the scene read again by
    GDAL under the scheme's other name (abfs://: /vsiadls/; gcs://: /vsigs/)."""
    root = request.getfixturevalue(store)
    cog = scene_1000x700[0].with_name(f"scene_cog_{store}.tif")
    rasterio.shutil.copy(scene_1000x700[0], cog, driver="COG")
    scene, checkpoint = f"{root}/scenes/scene.tif", f"{root}/models/random.safetensors"
    storage.write_bytes(scene, cog.read_bytes())
    storage.write_bytes(checkpoint, random_checkpoint.read_bytes())
    out = f"{root}/runs/one"
    cfg = run_config(
        Path("unused"), [], Path("unused"), BLOCK, f"model.checkpoint={checkpoint}",
        f"inputs=[{scene!r}]", f"out={out!r}",
    )  # fmt: skip
    result = run(cfg, client2)
    assert result.ok, (result.failed_scenes, result.failed_blocks)
    assert_same_as_local(out, local_reference)
    manifest = json.loads(storage.read_text(f"{out}/manifest.json"))
    assert manifest["status"] == "finished" and manifest["scenes"][0]["path"] == scene
    assert manifest["model"]["checkpoint"] == checkpoint
    assert storage.exists(f"{out}/quicklook.png") and storage.exists(f"{out}/item.json")
    secret = _secret_of(store)
    assert secret not in json.dumps(manifest) and secret not in caplog.text
    if store == "container":  # as users open it: fsspec's adlfs (it finds the credentials as GDAL does)
        assert opened_with_fsspec(f"{out}/mosaic.zarr") == opened_with_fsspec(str(local_reference / "mosaic.zarr"))
    other_name = scene.replace(f"{storage.scheme(root)}://", f"{gdal_scheme}://")
    with storage.open_raster(other_name) as src, rasterio.open(cog) as ref:
        assert src.crs == ref.crs and src.transform == ref.transform
        np.testing.assert_array_equal(
            src.read(window=((100, 300), (200, 500))), ref.read(window=((100, 300), (200, 500)))
        )
    with pytest.raises(storage.StorageError, match=f"{root}/scenes/missing.tif: no such object"):
        storage.read_bytes(f"{root}/scenes/missing.tif")
    small = f"{root}/scenes/small.tif"  # one PUT, where the scene took a multipart upload
    with rasterio.open(scene_1000x700[0]) as src:
        pixels = src.read(window=((0, 48), (0, 64)))
        profile = {"driver": "GTiff", "width": 64, "height": 48, "count": src.count, "dtype": src.dtypes[0]}
        profile.update(crs=src.crs, transform=src.transform, nodata=src.nodata)
    with storage.staged(small) as path, rasterio.open(path, "w", **profile) as dst:
        dst.write(pixels)
    with storage.open_raster(small) as src:
        np.testing.assert_array_equal(src.read(), pixels)


def test_a_local_file_written_in_place_replaces_the_old_one_only_once_whole(tmp_path):
    """An export stopped by an error (a full disk) leaves the previous COG or GeoPackage, not half
    of a new one, and no temporary file beside it."""
    target = tmp_path / "classes.tif"
    target.write_bytes(b"the previous export")
    with pytest.raises(OSError, match="No space"), storage.staged(str(target)) as path:
        assert path.parent == tmp_path and path.suffix == ".tif"  # writers that go by the suffix
        path.write_bytes(b"half of a new one")
        raise OSError(28, "No space left on device")
    assert target.read_bytes() == b"the previous export" and [p.name for p in tmp_path.iterdir()] == ["classes.tif"]
    with storage.staged(str(target)) as path:
        path.write_bytes(b"a new one")
    assert target.read_bytes() == b"a new one" and [p.name for p in tmp_path.iterdir()] == ["classes.tif"]


def test_a_local_file_that_cannot_be_put_in_place_is_named_and_leaves_no_temporary_file(tmp_path):
    """A folder where a manifest or an export goes: the error names the place, not the
    temporary name (a file that is gone), and nothing is left beside it."""
    (tmp_path / "manifest.json").mkdir()
    (tmp_path / "classes.tif").mkdir()
    with pytest.raises(IsADirectoryError) as written:
        storage.write_text(str(tmp_path / "manifest.json"), "{}")
    with pytest.raises(IsADirectoryError) as staged, storage.staged(str(tmp_path / "classes.tif")) as path:
        path.write_bytes(b"a new export")
    for failure, name in ((written, "manifest.json"), (staged, "classes.tif")):
        assert failure.value.filename == str(tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classes.tif", "manifest.json"]


def test_the_profiles_region_reaches_gdal_when_the_keys_are_in_the_environment(tmp_path):
    """With keys in the environment, GDAL and obstore take the region from AWS_REGION or
    AWS_DEFAULT_REGION only; the AWS tools take it from the profile too. geoseg puts it there."""
    config = tmp_path / "config"
    config.write_text("[default]\nregion = eu-central-1\n\n[profile paris]\nregion = eu-west-3\n")
    keys = {"AWS_ACCESS_KEY_ID": "key", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_CONFIG_FILE": str(config)}
    assert storage.gdal_settings(keys)["AWS_REGION"] == "eu-central-1"
    assert storage.gdal_settings({**keys, "AWS_PROFILE": "paris"})["AWS_REGION"] == "eu-west-3"
    named = storage.gdal_settings({**keys, "AWS_REGION": "us-west-2"})  # the user's own stands
    assert "AWS_REGION" not in named and named["AWS_DEFAULT_REGION"] == "us-west-2"
    assert "AWS_REGION" not in storage.gdal_settings({"AWS_CONFIG_FILE": str(config)})  # GDAL reads the file
    assert "AWS_REGION" not in storage.gdal_settings({**keys, "AWS_CONFIG_FILE": str(tmp_path / "none")})


def test_gdal_gets_the_endpoints_the_cloud_tools_variables_name():
    s3 = storage.gdal_settings({"AWS_ENDPOINT_URL": "http://minio.local:9000", "AWS_REGION": "eu-central-1"})
    assert (s3["AWS_S3_ENDPOINT"], s3["AWS_HTTPS"], s3["AWS_VIRTUAL_HOSTING"]) == ("minio.local:9000", "NO", "FALSE")
    assert s3["AWS_DEFAULT_REGION"] == "eu-central-1"
    gcs = storage.gdal_settings({"GOOGLE_BASE_URL": "http://127.0.0.1:4443", "GOOGLE_SKIP_SIGNATURE": "true"})
    assert gcs["CPL_GS_ENDPOINT"] == "http://127.0.0.1:4443/" and gcs["GS_NO_SIGN_REQUEST"] == "YES"
    azure = storage.gdal_settings(
        {
            "AZURE_STORAGE_ACCOUNT_NAME": "acct",
            "AZURE_STORAGE_ACCOUNT_KEY": "a2V5",
            "AZURE_STORAGE_ENDPOINT": "https://acct.blob.core.chinacloudapi.cn",
        }
    )
    assert azure["AZURE_STORAGE_ACCOUNT"] == "acct" and azure["AZURE_STORAGE_ACCESS_KEY"] == "a2V5"
    assert azure["AZURE_STORAGE_CONNECTION_STRING"] == (
        "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=a2V5;"
        "BlobEndpoint=https://acct.blob.core.chinacloudapi.cn;"
    )
    sas = storage.gdal_settings(
        {"AZURE_STORAGE_ENDPOINT": "https://x.blob.example", "AZURE_STORAGE_SAS_TOKEN": "?sv=1"}
    )
    assert sas["AZURE_STORAGE_CONNECTION_STRING"].startswith(
        "DefaultEndpointsProtocol=https;SharedAccessSignature=sv=1;"
    )
    # no key, no token (a managed identity): GDAL keeps its own settings, nobody else's key
    assert "AZURE_STORAGE_CONNECTION_STRING" not in storage.gdal_settings({"AZURE_STORAGE_ENDPOINT": "https://x"})
    emulator = storage.gdal_settings({"AZURE_STORAGE_USE_EMULATOR": "true"})
    assert "BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;" in emulator["AZURE_STORAGE_CONNECTION_STRING"]
    # what the user set is theirs: never replaced
    assert "AWS_S3_ENDPOINT" not in storage.gdal_settings({"AWS_ENDPOINT_URL": "http://a:1", "AWS_S3_ENDPOINT": "b:2"})
    assert storage.gdal_settings({}).keys() == storage.gdal_settings({"GOOGLE_SKIP_SIGNATURE": "no"}).keys()


def test_a_stream_to_the_store_that_fails_leaves_no_object_and_no_upload_parts(remote):
    from geoseg.vector_io import LayerWriter

    s3 = boto3.client("s3", endpoint_url=S3_ENDPOINT)
    name = remote["bucket"].removeprefix("s3://")
    payload = np.random.default_rng(0).integers(0, 255, 20 << 20, dtype=np.uint8).tobytes()  # 3 parts

    def pending() -> int:
        return len(s3.list_multipart_uploads(Bucket=name).get("Uploads", []))

    writer = storage.open_writer(f"{remote['bucket']}/streams/complete.bin")
    writer.write(payload)
    writer.close()
    assert storage.read_bytes(f"{remote['bucket']}/streams/complete.bin") == payload
    writer = storage.open_writer(f"{remote['bucket']}/streams/aborted.bin")
    writer.write(payload)  # parts are on their way
    writer.abort()
    writer = storage.open_writer(f"{remote['bucket']}/streams/dropped.bin")
    writer.write(payload)
    del writer  # never closed: dropped, never completed half written
    assert not storage.exists(f"{remote['bucket']}/streams/aborted.bin")
    assert not storage.exists(f"{remote['bucket']}/streams/dropped.bin")
    assert pending() == 0

    layer = f"{remote['bucket']}/streams/polygons.parquet"
    storage.write_bytes(layer, b"an older layer")
    polygons = gpd.GeoDataFrame({"class_id": [1]}, geometry=[shapely.box(0, 0, 1, 1)], crs="EPSG:32633")
    writer = LayerWriter(layer, "EPSG:32633")
    writer.write(polygons)
    writer.abort()  # the older layer stays, whole, and the store keeps no part of the new one
    assert storage.read_bytes(layer) == b"an older layer" and pending() == 0


@pytest.mark.parametrize("where", ["local", "store"])
def test_partials_round_trip_and_older_blocks_still_load(where, tmp_path, remote, monkeypatch, caplog):
    """Step-1 results saved, then read back as a neighbour reads them (only the frames that
    overlap its block); a block saved before records held the layer index (a meta.json per
    layer, uncompressed arrays) still loads, so a run started by an older version resumes."""
    import io

    from geoseg import partials
    from geoseg.segment import Frame, Partial
    from geoseg.tiling import Rect, Span

    rng = np.random.default_rng(1)
    frames = [  # above, and reaching in from the left of, a block at rows/cols 64..128
        Frame(Rect(Span(40, 64), Span(40, 150)), rng.integers(0, 99, (8, 24, 110), dtype=np.int32)),
        Frame(Rect(Span(64, 128), Span(40, 70)), rng.integers(0, 99, (8, 64, 30), dtype=np.int32)),
    ]
    interior = Rect(Span(0, 40), Span(0, 40))
    layer = Partial(interior, rng.integers(0, 7, (40, 40), dtype=np.uint8), np.full((40, 40), 80, np.uint8), frames, 9)
    root = str(tmp_path) if where == "local" else f"{remote['bucket']}/partials-{os.getpid()}"
    record = {"status": "done", "tiles": 9, "layers": partials.layer_index({"all": layer})}
    written, held = partials.save_block(storage.join(root, "new"), {"all": layer}, record)
    assert partials.load_record(storage.join(root, "new")) == written
    assert partials.load_record(storage.join(root, "absent")) is None
    objects = [storage.name(loc) for loc in storage.list_files(storage.join(root, "new"))]
    # on a store: one object, the arrays at byte ranges the record gives, and the record at its end
    if where == "store":  # the pack named by its arrays, so a record always finds its own
        pack = written["layers"]["all"]["pack"]["object"]
        assert objects == [pack] and re.fullmatch(r"step1-[0-9a-f]{16}\.pack", pack)
        data = storage.read_bytes(storage.join(root, "new", pack))
        length = struct.unpack("<Q", data[-8:])[0]
        assert json.loads(data[-8 - length : -8]) == written
        # the bytes step 1 hands its neighbours are the pack's: they cut their frames from them
        # with no request (the folder given has nothing)
        assert held == data
        below = Rect(Span(64, 128), Span(64, 128))
        handed = partials.load_layers(storage.join(root, "nowhere"), written["layers"], within=below, pack=held)
        np.testing.assert_array_equal(handed["all"].classes, layer.classes)
        assert [f.rect for f in handed["all"].frames] == [frames[1].rect]
        np.testing.assert_array_equal(handed["all"].frames[0].sums, frames[1].sums)
        # a record longer than the pack's end fetched first takes a second request
        monkeypatch.setattr(partials, "_TAIL", 64)
        assert partials.load_record(storage.join(root, "new")) == written
        monkeypatch.undo()
        # a cut-off pack is no record: the block is computed again (and logged)
        storage.write_bytes(storage.join(root, "cut", pack), data[:-20])
        assert partials.load_record(storage.join(root, "cut")) is None
        assert "is damaged" in caplog.text
        # the layout of the version before: the arrays' object, and the record beside it
        v1 = {"object": "arrays-0123456789abcdef.zst", "ranges": written["layers"]["all"]["pack"]["ranges"]}
        v1_record = {**written, "layers": {"all": {**written["layers"]["all"], "pack": v1}}}
        storage.write_bytes(storage.join(root, "v1", v1["object"]), data[: -8 - length])
        storage.write_text(storage.join(root, "v1", "record.json"), json.dumps(v1_record))
        assert partials.load_record(storage.join(root, "v1")) == v1_record
        v1_layer = partials.load_layers(storage.join(root, "v1"), v1_record["layers"])["all"]
        np.testing.assert_array_equal(v1_layer.classes, layer.classes)
        assert [f.rect for f in v1_layer.frames] == [f.rect for f in frames]
    else:  # on disk: an .npy per array (read memory-mapped), which the neighbours read there
        assert held is None
        assert sorted(objects) == sorted(["record.json", "classes.npy", "confidence.npy", "frame0.npy", "frame1.npy"])
    assert ("pack" in written["layers"]["all"]) == (where == "store")
    below = Rect(Span(64, 128), Span(64, 128))  # the first frame lies wholly outside it
    loaded = partials.load_layers(storage.join(root, "new"), written["layers"], interior=False, within=below)["all"]
    assert [f.rect for f in loaded.frames] == [frames[1].rect]
    np.testing.assert_array_equal(loaded.frames[0].sums, frames[1].sums)
    whole = partials.load_layers(storage.join(root, "new"), written["layers"])["all"]
    np.testing.assert_array_equal(whole.classes, layer.classes)
    np.testing.assert_array_equal(whole.confidence, layer.confidence)
    assert [f.rect for f in whole.frames] == [f.rect for f in frames]

    if where == "store":  # one object per array (.npy.zst), as the version before the pack saved them
        from numcodecs import Zstd

        for name, array in [("classes", layer.classes), ("confidence", layer.confidence)] + [
            (f"frame{k}", f.sums) for k, f in enumerate(frames)
        ]:
            buffer = io.BytesIO()
            np.save(buffer, array)
            storage.write_bytes(
                storage.join(root, "zst", "all", f"{name}.npy.zst"), Zstd(level=1).encode(buffer.getvalue())
            )
        unpacked = partials.load_layers(storage.join(root, "zst"), record["layers"], within=below)["all"]
        np.testing.assert_array_equal(unpacked.classes, layer.classes)
        np.testing.assert_array_equal(unpacked.frames[0].sums, frames[1].sums)

    old = storage.join(root, "old", "all")  # the layout of earlier versions
    for name, array in [("classes", layer.classes), ("confidence", layer.confidence)] + [
        (f"frame{k}", f.sums) for k, f in enumerate(frames)
    ]:
        buffer = io.BytesIO()
        np.save(buffer, array)
        storage.write_bytes(storage.join(old, f"{name}.npy"), buffer.getvalue())
    storage.write_text(storage.join(old, "meta.json"), json.dumps(record["layers"]["all"]))
    storage.write_text(storage.join(root, "old", "record.json"), json.dumps({"status": "done", "tiles": 9}))
    legacy = partials.load_layers(storage.join(root, "old"))["all"]
    np.testing.assert_array_equal(legacy.classes, layer.classes)
    assert [f.rect for f in legacy.frames] == [f.rect for f in frames] and legacy.tiles == 9


def mark_saved_record(folder: str, **changes: object) -> None:
    """Change the record at the end of a block's step-1 pack on the store (geoseg.partials)."""
    [loc] = [loc for loc in storage.list_files(folder + "/") if storage.name(loc).startswith("step1-")]
    data = storage.read_bytes(loc)
    length = struct.unpack("<Q", data[-8:])[0]
    record = json.dumps({**json.loads(data[-8 - length : -8]), **changes}).encode()
    storage.write_bytes(loc, data[: -8 - length] + record + struct.pack("<Q", len(record)))


def test_a_saved_step_one_on_the_store_is_reused_while_its_lookup_overlaps_the_reads(remote, scene_1000x700):
    """On a store, step 1 looks for a block's saved record while it reads the block: a record
    found stops the block's forward passes and is what the task returns, even where the scene
    can no longer be read; without one the read's error is the block's."""
    from geoseg.blocks import PACK, partials_root, predict_task
    from geoseg.grid import grid_from_scenes
    from geoseg.inference import InferenceSettings, get_predictor
    from geoseg.scenes import open_scene
    from geoseg.segment import StoppedError, TilingSettings, predict_block
    from geoseg.tiling import iter_blocks

    scene = open_scene(remote["cog"])
    grid = grid_from_scenes([scene])
    tiling = TilingSettings(128, 16, "gaussian", 256)
    settings = InferenceSettings(remote["checkpoint"], 8, "cpu", False, 1)
    block = next(b for b in iter_blocks(grid.height, grid.width, 256) if b.key == "1_1")
    at = partials_root(f"{remote['bucket']}/runs/saved-{os.getpid()}", "a" * 16)
    first = predict_task(block, {"all": [scene]}, grid, tiling, settings, at)
    assert first["status"] == "done" and first["tiles"] > 0
    # computed, the block hands its neighbours the pack it saved
    assert first[PACK] == storage.read_bytes(storage.join(at, "1_1", first["layers"]["all"]["pack"]["object"]))
    mark_saved_record(storage.join(at, "1_1"), predict_s=9999.0)

    # the same scene at a key with no object: only the saved record can answer for the block
    missing = dataclasses.replace(scene, path=f"{remote['bucket']}/scenes/gone-{os.getpid()}.tif")
    again = predict_task(block, {"all": [missing]}, grid, tiling, settings, at)
    assert again["status"] == "done" and again["predict_s"] == 9999.0
    assert PACK not in again  # found saved: its neighbours read the store's pack
    assert again["layers"] == first["layers"]
    # nor can a worker that computes votes otherwise, or one whose model cannot be loaded
    assert (
        predict_task(block, {"all": [scene]}, grid, tiling, settings, at, numerics="cuda-other")["predict_s"] == 9999.0
    )
    no_model = dataclasses.replace(settings, checkpoint=f"{remote['bucket']}/models/gone.safetensors")
    assert predict_task(block, {"all": [scene]}, grid, tiling, no_model, at)["predict_s"] == 9999.0
    storage.delete_tree(storage.join(at, "1_1"))
    failed = predict_task(block, {"all": [missing]}, grid, tiling, settings, at)
    assert failed["status"] == "failed" and missing.path in failed["error"] and "no such object" in failed["error"]

    # the stop is asked before each row of tiles, and stops the block at once
    predictor, asked = get_predictor(settings), []

    def second_time() -> bool:
        asked.append(1)
        return len(asked) > 1

    with pytest.raises(StoppedError):
        predict_block(block, [scene], grid, tiling, predictor, stop=second_time)
    assert len(asked) == 2
