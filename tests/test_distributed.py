"""The distributed path with real processes: `dask scheduler` + `dask worker` on 127.0.0.1, and kills."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from conftest import cli_config, make_random_checkpoint, predict_transitions, run_cli_args, run_config
from distributed import Client, LocalCluster

from geoseg.jobs import RunError, run, run_config_of, vectorize_run
from geoseg.segmentation import worker_slots

BIN = Path(sys.executable).parent


def _spawn(*args: str, log: Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A `dask` command (``args``) in a process of its own, output to ``log``."""
    return _popen([str(BIN / "dask"), *args], log, cwd, env)


def _popen(argv: list[str], log: Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
    # Own session: a kill of the group takes the worker's nanny and its child together.
    return subprocess.Popen(
        argv,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=cwd,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})},
    )


def _stop(procs: list[subprocess.Popen]) -> None:
    """Kill each process's group (a worker's nanny and its child together) and reap it."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)


def _start_scheduler(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """A `dask scheduler` process on 127.0.0.1; returns it and its scheduler file, once written."""
    sched_file = tmp_path / "scheduler.json"
    args = ["--host", "127.0.0.1", "--port", "0", "--no-dashboard", "--dashboard-address", ":0"]
    args += ["--scheduler-file", str(sched_file)]  # its health routes off 8787 as well: other clusters take it
    proc = _spawn("scheduler", *args, log=tmp_path / "scheduler.log")
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            json.loads(sched_file.read_text())["address"]
            break
        except (FileNotFoundError, ValueError, KeyError):  # not written yet, or half written
            time.sleep(0.1)
    return proc, sched_file


def _scheduler_and_two_workers(tmp_path: Path):
    scheduler, sched_file = _start_scheduler(tmp_path)
    procs = [scheduler]
    workers = [
        _spawn(
            "worker",
            "--scheduler-file",
            str(sched_file),
            "--nthreads",
            "1",
            "--no-dashboard",
            "--host",
            "127.0.0.1",
            "--name",
            f"w{i}",
            log=tmp_path / f"worker{i}.log",
        )
        for i in range(2)
    ]
    procs += workers
    with Client(scheduler_file=str(sched_file), timeout="30s") as client:
        client.wait_for_workers(2, timeout=60)
        address = client.scheduler.address
    yield address, workers
    _stop(procs)


@pytest.fixture
def dask_processes(tmp_path):
    """A `dask scheduler` and two `dask worker` processes of this test's own (it may kill them)."""
    yield from _scheduler_and_two_workers(tmp_path)


@pytest.fixture(scope="module")
def shared_dask_processes(tmp_path_factory):
    """A `dask scheduler` and two `dask worker` processes the module's tests that kill none share,
    as runs one after another share a cluster's."""
    yield from _scheduler_and_two_workers(tmp_path_factory.mktemp("dask"))


@pytest.fixture(scope="module")
def slow_checkpoint(tmp_path_factory):
    """A wider random model, so a run lasts long enough to be killed in the middle."""
    return make_random_checkpoint(tmp_path_factory.mktemp("slow") / "m.safetensors", seed=1, depth=3, base_width=16)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, slow_checkpoint, scene_1000x700, client2):
    """A finished run of the slow model, block 128."""
    out = tmp_path_factory.mktemp("dref")
    run(
        run_config(slow_checkpoint, [scene_1000x700[0]], out, "output.block_size=128", "output.polygons=false"), client2
    )
    return out


@pytest.fixture(scope="module")
def reference_mosaic(reference_run):
    return xr.open_zarr(reference_run / "mosaic.zarr")["classes"].values


def markers(out: Path) -> int:
    return len(list((out / ".geoseg" / "blocks").glob("*.json")))


def test_scheduler_and_worker_processes_give_the_local_mosaic(
    tmp_path, shared_dask_processes, slow_checkpoint, scene_1000x700, reference_mosaic
):
    address, _ = shared_dask_processes
    cfg = run_config(
        slow_checkpoint, [scene_1000x700[0]], tmp_path / "out", "output.block_size=256", f"cluster.address={address}"
    )
    result = run(cfg)
    assert result.ok
    np.testing.assert_array_equal(xr.open_zarr(tmp_path / "out" / "mosaic.zarr")["classes"].values, reference_mosaic)
    assert (tmp_path / "out" / "polygons.gpkg").exists()


def test_sigkill_of_a_worker_mid_run_still_completes(
    tmp_path, dask_processes, slow_checkpoint, scene_1000x700, reference_mosaic
):
    address, workers = dask_processes
    out = tmp_path / "out"
    cfg = run_config(
        slow_checkpoint,
        [scene_1000x700[0]],
        out,
        "output.block_size=128",
        "output.polygons=false",
        f"cluster.address={address}",
    )
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(result=run(cfg)))
    thread.start()
    deadline = time.time() + 120
    while markers(out) < 3 and time.time() < deadline:
        time.sleep(0.05)
    total_blocks = 6 * 8
    assert markers(out) < total_blocks, "the run finished before the kill: nothing was tested"
    os.killpg(workers[0].pid, signal.SIGKILL)
    thread.join(timeout=300)
    assert outcome["result"].ok
    np.testing.assert_array_equal(xr.open_zarr(out / "mosaic.zarr")["classes"].values, reference_mosaic)
    assert not (out / ".geoseg" / "partials").exists()  # nor any half-written folder of the lost worker


def test_killed_run_resumes_with_only_the_missing_blocks(
    tmp_path, slow_checkpoint, random_checkpoint, scene_1000x700, reference_mosaic, client1
):
    """Killed in the middle (after an --overwrite of an earlier run with another model and more
    layers), the run resumes with only the missing blocks, and the earlier run's layers go."""
    out = tmp_path / "out"
    cwd = Path(__file__).parent.parent
    layers = "vector.formats=[gpkg, parquet]"
    earlier = cli_config(scene_1000x700[0], out, f"model.checkpoint={random_checkpoint}", layers)
    assert run(earlier, client1).ok and (out / "polygons.parquet").exists()
    overrides = [
        f"model.checkpoint={slow_checkpoint}",
        "output.block_size=128",
        "tiling.tile_size=128",
        "tiling.overlap=16",
        "cluster.n_workers=1",
    ]
    args = [sys.executable, "-m", "geoseg", *run_cli_args(scene_1000x700[0], out, *overrides)]
    killed = [*args, "--overwrite"]
    proc = subprocess.Popen(
        killed, cwd=cwd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 180
    while markers(out) < 5 and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = markers(out)
    assert 5 <= done_before < 48, "the run must be killed in the middle"
    # the killed run's manifest names the earlier run's layers it would have removed
    assert json.loads((out / "manifest.json").read_text())["outputs"]["polygons_parquet"] == str(
        out / "polygons.parquet"
    )
    res = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert not (out / "polygons.parquet").exists() and "polygons_parquet" not in manifest["outputs"]
    assert manifest["summary"]["reused"] >= done_before
    assert manifest["summary"]["computed"] == 48 - manifest["summary"]["reused"]
    np.testing.assert_array_equal(xr.open_zarr(out / "mosaic.zarr")["classes"].values, reference_mosaic)
    # every overview chunk whole, those the killed run wrote or not: each level is the mosaic's
    import zarr

    from geoseg.overviews import downsample

    root = zarr.open_group(out / "mosaic.zarr", mode="r")
    assert root.attrs["geoseg"]["overviews"] == [2, 4]
    for f in (2, 4):
        classes, confidence = downsample(root["classes"][:], root["confidence"][:], f)
        np.testing.assert_array_equal(root[f"overviews/{f}/classes"][:], classes)
        np.testing.assert_array_equal(root[f"overviews/{f}/confidence"][:], confidence)
        assert root[f"overviews/{f}/classes"].chunks == (min(128, classes.shape[0]), min(128, classes.shape[1]))


def test_step_one_is_handed_out_by_threads_or_by_gpus():
    """One block per worker thread; with ``cluster.gpu_resource``, one per GPU a worker declares."""
    with (
        LocalCluster(n_workers=2, threads_per_worker=2, processes=False, resources={"GPU": 1}) as cluster,
        Client(cluster) as client,
    ):
        assert sorted(worker_slots(client, None).values()) == [2, 2]
        assert sorted(worker_slots(client, {"GPU": 1}).values()) == [1, 1]
        assert sorted(worker_slots(client, {"GPU": 2}).values()) == [0, 0]


def test_gpu_resource_without_gpu_workers_is_a_clear_error(tmp_path, random_checkpoint, scene_1000x700):
    cfg = run_config(random_checkpoint, [scene_1000x700[0]], tmp_path, "cluster.gpu_resource=true")
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=False) as cluster,
        Client(cluster) as client,
        pytest.raises(RunError, match=r"gpu_resource is set, but none of the cluster's 1 workers declares a GPU"),
    ):
        run(cfg, client)


def test_gpu_resource_blocks_run_on_workers_that_declare_one(
    tmp_path, slow_checkpoint, scene_1000x700, reference_mosaic
):
    """Blocks ask for a GPU: on workers declaring ``GPU=1`` (CPU here) the mosaic is the same."""
    cfg = run_config(
        slow_checkpoint, [scene_1000x700[0]], tmp_path, "cluster.gpu_resource=true", "output.block_size=256",
        "output.polygons=false", "model.device=cpu",
    )  # fmt: skip
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=False, resources={"GPU": 1}) as cluster,
        Client(cluster) as client,
    ):
        assert run(cfg, client).ok
    np.testing.assert_array_equal(xr.open_zarr(tmp_path / "mosaic.zarr")["classes"].values, reference_mosaic)


def test_the_workers_numerics_enter_the_fingerprint_and_a_cpu_run_keeps_its_own(
    tmp_path, random_checkpoint, scene_1000x700, client2
):
    """Votes from a GPU (AMP, compiled) must not be summed with a CPU's: the fingerprint says how the
    workers compute them. "auto" resolves on the workers (here: the CPU)."""
    from geoseg.inference import InferenceSettings, numerics
    from geoseg.planning import plan_run, with_numerics

    cfg = run_config(random_checkpoint, [scene_1000x700[0]], tmp_path, "output.polygons=false")
    plan = plan_run(cfg)
    kinds = ["cuda", "cuda-bfloat16", "cuda-float16", "cuda-bfloat16-compiled", "cpu+cuda-bfloat16"]
    prints = {with_numerics(plan, kind).fingerprint for kind in kinds}
    assert len(prints) == len(kinds) and plan.fingerprint not in prints
    assert with_numerics(plan, "cpu").fingerprint == plan.fingerprint
    assert numerics(InferenceSettings("x", device="auto", amp=True)) == "cpu"  # AMP is for CUDA only
    assert numerics(InferenceSettings("x", device="cpu", compile=True)) == "cpu-compiled"
    assert run(cfg, client2).ok
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["fingerprint"] == plan.fingerprint  # runs on CPU resume as before


def test_a_worker_that_computes_votes_otherwise_fails_its_block_and_a_run_waits_for_a_first_worker(
    tmp_path, random_checkpoint, scene_1000x700
):
    """A worker that joined after the run asked its workers, and computes votes another way,
    fails the block rather than mix votes; a run started before any worker joined (a batch
    job's) asks the first one that does."""
    from geoseg.blocks import predict_task, scene_layers
    from geoseg.inference import InferenceSettings
    from geoseg.planning import plan_run

    cfg = run_config(random_checkpoint, [scene_1000x700[0]], tmp_path / "out", "output.polygons=false")
    plan = plan_run(cfg)
    block = plan.blocks[0]
    layers = scene_layers(block, plan.scenes, plan.footprints, plan.tiling.tile_size, "first")
    settings = InferenceSettings(str(random_checkpoint), device="cpu")
    record = predict_task(
        block, layers, plan.grid, plan.tiling, settings, str(tmp_path / "p"), numerics="cuda-bfloat16"
    )
    assert record["status"] == "failed"
    assert record["error"] == "RuntimeError: this worker computes votes as cpu, the run as cuda-bfloat16"
    with LocalCluster(n_workers=0, threads_per_worker=1, processes=False) as cluster, Client(cluster) as client:
        threading.Timer(1.0, cluster.scale, [1]).start()
        assert run(cfg, client).ok
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["fingerprint"] == plan.fingerprint


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA device is visible")
def test_model_device_cuda_without_a_cuda_worker_is_one_line_before_any_block(
    tmp_path, random_checkpoint, scene_1000x700, client2
):
    cfg = run_config(random_checkpoint, [scene_1000x700[0]], tmp_path / "out", "model.device=cuda")
    with pytest.raises(RunError, match=r"^model.device is 'cuda' but no CUDA device is visible"):
        run(cfg, client2)
    assert not (tmp_path / "out").exists()


def test_a_worker_that_joins_a_running_job_gets_blocks_without_waiting_for_one_to_finish(
    tmp_path, monkeypatch, slow_checkpoint, scene_1000x700, reference_mosaic
):
    """Batch jobs start one by one: the run begins with no worker (it waits for the first to ask
    how it computes votes), and the worker that joins fills both its threads at once (Dask's
    queue) instead of one until the first block is finished."""
    monkeypatch.setenv("DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION", "1.0")  # as the README advises
    scheduler, sched_file = _start_scheduler(tmp_path)
    procs = [scheduler]
    try:
        deadline = time.time() + 60
        address = json.loads(sched_file.read_text())["address"]
        out = tmp_path / "out"
        cfg = run_config(
            slow_checkpoint, [scene_1000x700[0]], out, "output.block_size=256", "output.polygons=false",
            f"cluster.address={address}",
        )  # fmt: skip
        outcome = {}
        thread = threading.Thread(target=lambda: outcome.update(result=run(cfg)))
        thread.start()
        with Client(address, timeout="30s") as client:
            since = time.time()
            while client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.clients)) < 3:
                assert time.time() < deadline, "the run never connected"  # its client, ours, the scheduler's
                time.sleep(0.1)
            worker = ["worker", address, "--nthreads", "2", "--no-dashboard", "--host", "127.0.0.1"]
            procs.append(_spawn(*worker, log=tmp_path / "worker.log"))
            thread.join(timeout=300)
            events = predict_transitions(client, since)
        assert outcome["result"].ok
        running = most_before_a_finish = 0
        for _, start, finish in events:
            if start == "processing":  # the first block is finished
                break
            running += finish == "processing"
            most_before_a_finish = max(most_before_a_finish, running)
        assert most_before_a_finish == 2, f"one thread idled until a block finished: {events}"
        np.testing.assert_array_equal(xr.open_zarr(out / "mosaic.zarr")["classes"].values, reference_mosaic)
    finally:
        _stop(procs)


def test_workers_started_with_geoseg_worker_env_keep_forward_pass_buffers(tmp_path):
    """A `dask worker` started after `eval "$(geoseg worker-env)"` and a worker of geoseg's own
    LocalCluster reuse a forward pass's buffers; a plain `dask worker` has the kernel map and
    zero them again on every pass (its task thread gets a malloc arena of its own)."""
    from geoseg.cluster import dask_client
    from geoseg.config import ClusterConfig

    # nested: pickled by value, the workers cannot import this test module
    def _forward_pass_faults(checkpoint: str, tile: int = 256, batches: int = 3) -> dict:
        """In a worker's task thread: minor page faults of ``batches`` forward passes after a first
        one, and the settings the worker runs with."""
        import resource

        import dask

        from geoseg.inference import InferenceSettings, get_predictor

        predictor = get_predictor(InferenceSettings(checkpoint, 8, "cpu", False, 1))
        tiles = np.zeros((8, len(predictor.ckpt.bands), tile, tile), dtype=np.float32)
        predictor.probabilities(tiles)  # the heap grows to a pass's working size
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(batches):
            predictor.probabilities(tiles)
        return {
            "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before,
            "profiler": dask.config.get("distributed.worker.profile.enabled"),
            "tunables": os.environ.get("GLIBC_TUNABLES", ""),
        }

    scheduler, sched_file = _start_scheduler(tmp_path)
    worker = f'"{BIN}/dask" worker --scheduler-file {sched_file} --nthreads 1 --no-dashboard --host 127.0.0.1'
    tuned = f'eval "$("{sys.executable}" -m geoseg worker-env)" && exec {worker} --name tuned'
    procs = [scheduler]
    for name, command in [("tuned", tuned), ("plain", f"exec {worker} --name plain")]:
        procs.append(_popen(["bash", "-c", command], log=tmp_path / f"{name}.log"))
    try:
        with Client(scheduler_file=str(sched_file), timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
            by_name = {info["name"]: addr for addr, info in client.scheduler_info()["workers"].items()}
            seen = {
                name: client.submit(_forward_pass_faults, "builtin:demo", workers=[addr], pure=False).result()
                for name, addr in by_name.items()
            }
        with dask_client(ClusterConfig(n_workers=1, dashboard=False)) as client:
            seen["local"] = client.submit(_forward_pass_faults, "builtin:demo", pure=False).result()
    finally:
        _stop(procs)
    for name in ("tuned", "local"):
        assert "glibc.malloc.arena_max=1" in seen[name]["tunables"], seen
        assert seen[name]["profiler"] is False, seen
        assert seen[name]["faults"] < 100, seen  # the heap keeps the buffers: nothing to fault in
    assert seen["plain"]["faults"] > 5 * (seen["tuned"]["faults"] + 20), seen  # what the settings avoid


def test_the_cpu_limit_of_a_container_is_read_from_its_cgroup_or_an_ancestor(tmp_path):
    from geoseg.cluster import cgroup_cpu_limit

    def write(path: Path, text: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    # cgroup v2, a pod's limit on the pod's group and none on the container's
    write(tmp_path / "v2" / "proc", "0::/kubepods/pod1/ctr\n")
    write(tmp_path / "v2" / "fs" / "kubepods" / "pod1" / "cpu.max", "400000 100000\n")
    write(tmp_path / "v2" / "fs" / "kubepods" / "pod1" / "ctr" / "cpu.max", "max 100000\n")
    assert cgroup_cpu_limit(str(tmp_path / "v2" / "proc"), str(tmp_path / "v2" / "fs")) == 4.0
    # cgroup v1 in a container: the path named as the host names it, the limit at the mount
    write(tmp_path / "v1" / "proc", "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n")
    write(tmp_path / "v1" / "fs" / "cpu,cpuacct" / "cpu.cfs_quota_us", "150000\n")
    write(tmp_path / "v1" / "fs" / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    write(tmp_path / "v1" / "fs" / "memory" / "cpu.cfs_quota_us", "50000\n")  # not the cpu controller's
    assert cgroup_cpu_limit(str(tmp_path / "v1" / "proc"), str(tmp_path / "v1" / "fs")) == 1.5
    write(tmp_path / "v1" / "fs" / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1\n")
    assert cgroup_cpu_limit(str(tmp_path / "v1" / "proc"), str(tmp_path / "v1" / "fs")) is None


def test_a_worker_in_a_cgroup_limited_to_one_cpu_gives_torch_one_thread():
    """What Docker's --cpus and a pod's limits.cpu do, with the kernel's own cgroup (v1 or v2)."""
    from geoseg.cluster import usable_cores

    if usable_cores() < 2:
        pytest.skip("one core here: a limit of one CPU changes nothing")
    v1 = Path("/sys/fs/cgroup/cpu").is_dir()
    group = (Path("/sys/fs/cgroup/cpu") if v1 else Path("/sys/fs/cgroup")) / f"geoseg-test-{os.getpid()}"
    try:
        group.mkdir()
        if v1:
            (group / "cpu.cfs_quota_us").write_text(str(int((group / "cpu.cfs_period_us").read_text())))
        else:  # cgroup v2: the cpu controller must be on for the root's children
            (group / "cpu.max").write_text("100000 100000")
    except OSError as exc:
        with contextlib.suppress(OSError):
            group.rmdir()
        pytest.skip(f"no cgroup cpu controller this process may write: {exc}")
    try:
        code = (
            f"import os; open({str(group / 'cgroup.procs')!r}, 'w').write(str(os.getpid()))\n"
            "from geoseg.cluster import usable_cores; from geoseg.inference import auto_threads\n"
            "print(usable_cores(), auto_threads())"
        )
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        assert res.stdout.split() == ["1", "1"]
    finally:
        group.rmdir()


def test_geoseg_malloc_settings_join_the_users_own_and_leave_theirs_alone():
    from geoseg.cluster import with_malloc_tunables

    assert with_malloc_tunables("") == "glibc.malloc.hugetlb=1:glibc.malloc.arena_max=1"
    mine = "glibc.malloc.arena_max=4:glibc.mem.tagging=1"
    assert with_malloc_tunables(mine) == mine + ":glibc.malloc.hugetlb=1"


def test_a_cluster_without_dashboard_leaves_port_8787_to_others(recwarn):
    """Another Dask (or a second run) holding 8787 must not make geoseg's scheduler warn or
    take it: without a dashboard, the scheduler's health routes go on a free port."""
    import contextlib
    import socket

    from geoseg.cluster import dask_client
    from geoseg.config import ClusterConfig

    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with contextlib.suppress(OSError):  # held already: the situation under test
            other.bind(("127.0.0.1", 8787))
            other.listen()
        with dask_client(ClusterConfig(n_workers=1, dashboard=False)) as client:
            assert client.submit(sum, [1, 2]).result() == 3
    assert not [w for w in recwarn if "8787" in str(w.message)]


def cli_run(scene: Path, out: Path, checkpoint: Path, *overrides: str) -> list[str]:
    """The `geoseg run` command line of the slow model at block 128, as a user types it."""
    settings = [f"model.checkpoint={checkpoint}", "output.block_size=128", "tiling.tile_size=128", "tiling.overlap=16"]
    return [sys.executable, "-m", "geoseg", *run_cli_args(scene, out, *settings, *overrides)]


REPO = Path(__file__).parent.parent


def test_two_runs_on_one_scheduler_at_once_each_get_their_own_mosaic(
    tmp_path, shared_dask_processes, slow_checkpoint, scene_1000x700, reference_mosaic
):
    address, _ = shared_dask_processes
    outs = [tmp_path / "a", tmp_path / "b"]
    extra = (f"cluster.address={address}", "output.polygons=false", "output.block_size=256")
    procs = [
        subprocess.Popen(cli_run(scene_1000x700[0], out, slow_checkpoint, *extra), cwd=REPO, stderr=subprocess.PIPE)
        for out in outs
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
    for out in outs:
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["status"] == "finished" and manifest["summary"]["computed"] == 12
        np.testing.assert_array_equal(xr.open_zarr(out / "mosaic.zarr")["classes"].values, reference_mosaic)
    confidence = [xr.open_zarr(out / "mosaic.zarr")["confidence"].values for out in outs]
    np.testing.assert_array_equal(*confidence)
    assert (
        json.loads((outs[0] / "manifest.json").read_text())["run_id"]
        != json.loads((outs[1] / "manifest.json").read_text())["run_id"]
    )


def test_a_run_without_an_address_joins_the_scheduler_dask_scheduler_address_names(
    tmp_path, shared_dask_processes, random_checkpoint, scene_1000x700
):
    """As in a DaskJob of the Dask Kubernetes operator, which sets DASK_SCHEDULER_ADDRESS in the
    runner's pod: the blocks run on that scheduler's workers, not on a LocalCluster of the run's."""
    address, _ = shared_dask_processes
    out = tmp_path / "out"
    since = time.time()
    args = cli_run(scene_1000x700[0], out, random_checkpoint, "output.polygons=false", "output.block_size=256")
    res = subprocess.run(
        args,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "DASK_SCHEDULER_ADDRESS": address},
    )
    assert res.returncode == 0, res.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["summary"]["computed"] == 12
    with Client(address, timeout="30s") as client:
        done = {key for key, _, finish in predict_transitions(client, since) if finish == "memory"}
    assert len(done) == 12  # every block's step 1 went through the external scheduler


def test_a_second_run_on_the_same_output_is_refused_while_the_first_holds_it(
    tmp_path, random_checkpoint, scene_1000x700, client1
):
    """A live run holds OUT's lease (here this test process does, as a run would): a second run is
    refused with one line before it writes anything; once the lease is released it runs."""
    from geoseg.runstate import Lease

    out = tmp_path / "out"
    args = cli_run(scene_1000x700[0], out, random_checkpoint, "cluster.n_workers=1", "output.polygons=false")
    with Lease(out, "first"):
        res = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert res.returncode == 2
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "is in use by another geoseg run" in lines[0] and f"pid {os.getpid()}" in lines[0]
        assert sorted(p.name for p in out.iterdir()) == [".geoseg"]  # nothing written
    assert run(cli_config(scene_1000x700[0], out, f"model.checkpoint={random_checkpoint}"), client1).ok
    assert json.loads((out / "manifest.json").read_text())["status"] == "finished"


def test_a_killed_overwrite_rerun_is_refused_by_export_change_and_vectorize(
    tmp_path, slow_checkpoint, scene_1000x700, reference_run, client1
):
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    geoseg = [sys.executable, "-m", "geoseg"]
    # the finished run is accepted ...
    assert vectorize_run(str(out), run_config_of(str(out), []), client1) == str(out / "polygons.gpkg")
    # ... a rerun with --overwrite killed half way is not (its mosaic is half the new model's)
    args = [*cli_run(scene_1000x700[0], out, slow_checkpoint, "cluster.n_workers=1"), "--overwrite"]
    old_id = json.loads((out / "manifest.json").read_text())["run_id"]
    proc = subprocess.Popen(
        args, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )

    def rerun_has_committed(n: int) -> bool:
        return json.loads((out / "manifest.json").read_text())["run_id"] != old_id and markers(out) >= n

    deadline = time.time() + 180
    while not rerun_has_committed(3) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "running" and manifest["run_id"] != old_id
    assert not (out / "polygons.gpkg").exists()  # the replaced run's outputs went with it
    for command in (["export", str(out)], ["vectorize", str(out)], ["change", str(reference_run), str(out)]):
        res = subprocess.run([*geoseg, *command, "--out", str(tmp_path / "c")] if command[0] == "change" else
                             [*geoseg, *command], cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert res.returncode == 2, (command, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and f"{out}: the run did not finish" in lines[0], (command, res.stderr)
        assert "of 48 blocks committed" in lines[0]
    assert not (out / "classes.tif").exists() and not (tmp_path / "c" / "change.zarr").exists()


def test_blocks_are_polygonized_while_later_blocks_are_still_segmented(
    tmp_path, random_checkpoint, scene_1000x700, client2
):
    from distributed import get_task_stream

    cfg = run_config(random_checkpoint, [scene_1000x700[0]], tmp_path, "output.block_size=256")
    with get_task_stream(client2) as stream:
        assert run(cfg, client2).ok
    spans: dict[str, list[tuple[float, float]]] = {}
    for task in stream.data:
        for span in task["startstops"]:
            if span["action"] == "compute":
                spans.setdefault(str(task["key"]).split("-")[0], []).append((span["start"], span["stop"]))
    last_step2 = max(stop for _, stop in spans["finish"])
    assert len(spans["polygonize"]) == 12  # one per block to do
    assert min(start for start, _ in spans["polygonize"]) < last_step2  # not after the segmentation
    assert json.loads((tmp_path / "manifest.json").read_text())["timings"]["vectorize_s"] >= 0


def test_a_rerun_writes_the_overview_chunks_an_unfinished_run_missed_and_a_finished_one_none(
    tmp_path, random_checkpoint, scene_1000x700, client2
):
    """All blocks committed, then killed before level 4's chunks (the manifest still says
    running): the rerun writes those chunks from the committed blocks, and not level 2's, whose
    markers say they were written. A rerun of a finished run writes none."""
    import zarr

    from geoseg.overviews import downsample

    cfg = run_config(random_checkpoint, [scene_1000x700[0]], tmp_path, "output.block_size=256", "output.polygons=false")
    assert run(cfg, client2).ok
    store = tmp_path / "mosaic.zarr"
    chunks = sorted(p for p in (store / "overviews" / "4" / "classes" / "c").rglob("*") if p.is_file())
    markers = sorted((tmp_path / ".geoseg" / "overviews" / "4").glob("*.json"))
    assert chunks and len(markers) == 1  # 1000 x 700 px in blocks of 256: one chunk of 4 x 4 blocks
    for path in [*chunks, *markers]:  # as a run killed after its last block, before these chunks, leaves it
        path.unlink()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))
    level_two = {p: p.stat().st_mtime_ns for p in (store / "overviews" / "2").rglob("*") if p.is_file()}
    assert run(cfg, client2).ok
    root = zarr.open_group(store, mode="r")
    classes, _ = downsample(root["classes"][:], root["confidence"][:], 4)
    np.testing.assert_array_equal(root["overviews/4/classes"][:], classes)
    assert {p: p.stat().st_mtime_ns for p in level_two} == level_two  # marked written: left alone
    classes, _ = downsample(root["classes"][:], root["confidence"][:], 2)
    np.testing.assert_array_equal(root["overviews/2/classes"][:], classes)
    written = {p: p.stat().st_mtime_ns for p in (store / "overviews").rglob("*") if p.is_file()}
    assert run(cfg, client2).ok  # finished before: nothing to write
    assert {p: p.stat().st_mtime_ns for p in written} == written
    assert (tmp_path / ".geoseg" / "overviews" / "4" / "0_0.json").is_file()  # its marker is back


def test_a_chunk_a_stopped_run_was_to_write_again_is_written_by_the_next(
    tmp_path, random_checkpoint, scene_1000x700, client2
):
    """Run A left block 0_0 uncommitted (failed) and marked its chunks written; run B computes
    the block, but cannot write level 4's chunk. Run C must write that chunk: B took back the
    marker A left for it before writing anything."""
    import zarr

    from geoseg.overviews import downsample

    cfg = run_config(random_checkpoint, [scene_1000x700[0]], tmp_path, "output.block_size=256", "output.polygons=false")
    assert run(cfg, client2).ok
    (tmp_path / ".geoseg" / "blocks" / "0_0.json").unlink()  # as if it failed in A
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "status": "incomplete"}))
    level = tmp_path / "mosaic.zarr" / "overviews" / "4" / "classes" / "c"
    shutil.rmtree(level)
    level.write_text("")  # B's write of the chunk fails: a file where its folder goes
    b = run(cfg, client2)
    assert not b.ok and "overviews/4/0_0" in b.failed_blocks
    level.unlink()
    assert run(cfg, client2).ok
    root = zarr.open_group(tmp_path / "mosaic.zarr", mode="r")
    classes, _ = downsample(root["classes"][:], root["confidence"][:], 4)
    np.testing.assert_array_equal(root["overviews/4/classes"][:], classes)


def test_sigterm_stops_a_run_in_one_line_gives_the_lease_back_and_the_rerun_resumes(
    tmp_path, slow_checkpoint, scene_1000x700, reference_mosaic, client1
):
    """A batch system's SIGTERM (to the client only, as Kubernetes sends it) stops the run as
    Ctrl-C does: one line on stderr, exit 143, the lease given back at once (a rerun on another
    host need not wait for it to go stale), the manifest left running; the rerun resumes."""
    out = tmp_path / "out"
    overrides = ["output.block_size=128", "tiling.tile_size=128", "tiling.overlap=16", "cluster.n_workers=1"]
    args = [
        sys.executable,
        "-m",
        "geoseg",
        *run_cli_args(scene_1000x700[0], out, f"model.checkpoint={slow_checkpoint}", *overrides),
    ]
    proc = subprocess.Popen(
        args, cwd=Path(__file__).parent.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 180
    while markers(out) < 3 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == (
        "error: stopped by SIGTERM; the same command again goes on from what was committed"
    )
    assert "Traceback" not in stderr
    done_before = markers(out)
    assert 3 <= done_before < 48, "the run must be stopped in the middle"
    assert not (out / ".geoseg" / "lease.json").exists()
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"
    assert run(cli_config(scene_1000x700[0], out, f"model.checkpoint={slow_checkpoint}", *overrides), client1).ok
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["summary"]["reused"] >= done_before
    np.testing.assert_array_equal(xr.open_zarr(out / "mosaic.zarr")["classes"].values, reference_mosaic)


def _log_a_comm_error_with_a_secret() -> None:
    import logging

    try:
        raise OSError("Stream is closed\nwhile sending heartbeat")
    except OSError:
        logging.getLogger("distributed.worker").error(
            "Failed to communicate with scheduler during heartbeat for s3://b/k?X-Amz-Signature=abcdef0123",
            exc_info=True,
        )


def test_the_workers_of_a_local_cluster_log_one_line_without_a_secret(capfd):
    """Dask logs through handlers of its own, on the command's stderr: a worker's error (a comm
    closed as the cluster shuts down) is one line there, its traceback folded in, no secret."""
    from geoseg.cluster import dask_client
    from geoseg.config import ClusterConfig

    with dask_client(ClusterConfig(n_workers=1, threads_per_worker=1, dashboard=False)) as client:
        capfd.readouterr()
        client.run(_log_a_comm_error_with_a_secret)
        time.sleep(0.5)  # the worker's stderr is its own process's
        err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if "heartbeat" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].endswith("(OSError: Stream is closed while sending heartbeat)")
    assert "abcdef0123" not in err and "X-Amz-Signature=" in lines[0]
    # the scheduler and the nannies of a LocalCluster log in the command's own process
    snippet = (
        "from geoseg.cli import _setup_logging; _setup_logging(False); "
        "from test_distributed import _log_a_comm_error_with_a_secret as log_it; log_it()"
    )
    res = subprocess.run(
        [sys.executable, "-c", snippet], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=60
    )
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert res.stderr.strip().endswith("(OSError: Stream is closed while sending heartbeat)")
    assert "abcdef0123" not in res.stderr


def test_a_run_stopped_by_sigterm_before_its_first_block_leaves_no_output_folder(
    tmp_path, slow_checkpoint, scene_1000x700
):
    """A job cancelled in its first seconds (scancel, a pod evicted) is like a run that failed
    there: the OUT it created goes, so that a corrected command is not refused as another run's."""
    out = tmp_path / "out"
    args = [
        sys.executable,
        "-m",
        "geoseg",
        *run_cli_args(scene_1000x700[0], out, f"model.checkpoint={slow_checkpoint}"),
    ]
    args += ["--set", "cluster.n_workers=1", "--set", "output.block_size=128"]
    proc = subprocess.Popen(
        args, cwd=Path(__file__).parent.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while not (out / "manifest.json").exists() and time.time() < deadline:
        time.sleep(0.02)
    assert (out / "manifest.json").exists() and markers(out) == 0, "the run must be stopped before its first block"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert not out.exists()


def _sleep_long(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def test_a_local_cluster_leaves_the_callers_environment_as_it_was(monkeypatch):
    """Dask's nannies set the workers' environment (one OpenMP thread, GDAL's cache, malloc
    tunables, a hash seed) in their own process, which for geoseg's LocalCluster is the
    caller's: the workers get it, and the caller's environment, which the programs it starts
    inherit (a `dask worker` without those settings, say), is given back as it was."""
    from geoseg.cluster import WORKER_ENVIRON, dask_client
    from geoseg.config import ClusterConfig

    def worker_environ() -> dict:  # nested: pickled by value
        import os

        return {name: os.environ.get(name) for name in ("OMP_NUM_THREADS", "GDAL_CACHEMAX")}

    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    for name in ("GDAL_CACHEMAX", "GLIBC_TUNABLES", "PYTHONHASHSEED"):
        monkeypatch.delenv(name, raising=False)
    names = [*WORKER_ENVIRON, "PYTHONHASHSEED"]  # Dask adds the hash seed

    def caller_environ() -> dict:
        return {name: os.environ.get(name) for name in names}

    before = caller_environ()
    with dask_client(ClusterConfig(n_workers=1, dashboard=False)) as client:
        assert caller_environ() == before
        seen = list(client.run(worker_environ).values())
    assert caller_environ() == before
    assert seen == [{"OMP_NUM_THREADS": "7", "GDAL_CACHEMAX": "64"}]  # the caller's own value wins


def test_a_local_cluster_closed_under_a_running_task_says_nothing(capfd):
    """A job stopped while its workers compute (SIGTERM, an error) closes its LocalCluster under
    running tasks: the tasks cancelled and the workers killed are no news on the job's stderr."""
    from geoseg.cluster import dask_client
    from geoseg.config import ClusterConfig

    with dask_client(ClusterConfig(n_workers=1, threads_per_worker=1, dashboard=False)) as client:
        running = client.submit(_sleep_long, 30)
        deadline = time.time() + 30
        while not any(client.processing().values()) and time.time() < deadline:
            time.sleep(0.05)
        assert any(client.processing().values()), "the task must be running when the cluster closes"
        time.sleep(0.5)
        capfd.readouterr()
    time.sleep(0.5)
    assert capfd.readouterr().err == ""
    assert running.status != "finished"  # it was cut short, not waited for
