"""Dask client: a LocalCluster by default, or an existing scheduler's address."""

from __future__ import annotations

import logging
import math
import os
import shlex
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import dask
from distributed import Client, LocalCluster

from geoseg.config import ClusterConfig, ConfigError
from geoseg.logs import OneLineLogs, cluster_closing, quiet_dask_logs

log = logging.getLogger(__name__)


# Environment of the worker processes a LocalCluster spawns. Dask's default also sets
# MALLOC_TRIM_THRESHOLD_=65536, which makes torch's CPU forward passes ~1.5x slower (see
# geoseg.inference.tune_allocator). glibc.malloc.hugetlb=1 backs malloc's large chunks with
# transparent huge pages: they fault in 2 MB at a time instead of 4 kB (forward passes ran 1.4x
# faster here). glibc.malloc.arena_max=1 puts every thread on the main heap from the start, the
# only one tune_allocator can keep torch's 32 MB+ activation buffers in: a Dask task thread
# otherwise has an arena of its own, and its buffers are still mapped and faulted in on every
# pass (benchmarks/README.md). GDAL's block cache is kept small because every file block is
# read about once, so a cache sized by the machine's RAM only grows with the scene.
MALLOC_TUNABLES = {"glibc.malloc.hugetlb": "1", "glibc.malloc.arena_max": "1"}


def with_malloc_tunables(tunables: str) -> str:
    """``tunables`` (a GLIBC_TUNABLES value) with geoseg's malloc settings added; the user's own
    value of a setting wins."""
    settings = dict(item.split("=", 1) for item in tunables.split(":") if "=" in item)
    for name, value in MALLOC_TUNABLES.items():
        settings.setdefault(name, value)
    return ":".join(f"{name}={value}" for name, value in settings.items())


WORKER_ENVIRON = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "GDAL_CACHEMAX": "64",
    "GLIBC_TUNABLES": with_malloc_tunables(os.environ.get("GLIBC_TUNABLES", "")),
}


# Dask's own periodic work in each worker of a LocalCluster: the profiler of the event loop
# (a sample every 10 ms), the loop's latency tick (every 20 ms), the memory monitor (every
# 100 ms) and the system monitor's disk and network counters (every 500 ms) took 4.6 % of a
# core in an idle worker here, 0.3 % with these settings (benchmarks/README.md), time taken
# from the forward passes when every core is busy. Dask's config can turn the profiler back on.
WORKER_DASK_CONFIG = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "500ms",
    "distributed.worker.memory.monitor-interval": "500ms",
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.admin.system-monitor.disk": False,
}


# The scheduler of a LocalCluster gives a worker thread one queued step 1 at a time (Dask's
# default, 1.1, lets a block wait behind another on a busy worker while a thread elsewhere frees
# up). On a scheduler of your own: DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION=1.0, which
# `geoseg worker-env` exports too.
SCHEDULER_DASK_CONFIG = {"distributed.scheduler.worker-saturation": 1.0}


def worker_exports() -> list[str]:
    """Shell lines that give a worker geoseg did not start (a batch job, ``dask worker``) the
    environment and Dask settings of the workers of its LocalCluster, and a ``dask scheduler``
    its scheduler's (each ignores the other's)."""
    dask_env = {
        "DASK_" + key.upper().replace(".", "__").replace("-", "_"): str(value)
        for key, value in {**WORKER_DASK_CONFIG, **SCHEDULER_DASK_CONFIG}.items()
    }
    # GDAL's settings for cloud reads need no export: geoseg.storage derives them in every
    # process that imports geoseg (a worker does with its first task), from its own environment.
    return [f"export {name}={shlex.quote(value)}" for name, value in {**WORKER_ENVIRON, **dask_env}.items()]


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity (which batch schedulers set), and its
    cgroup's CPU limit (which Docker's ``--cpus`` and a Kubernetes pod's ``limits.cpu`` set)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit()
    return cores if limit is None else max(1, min(cores, math.ceil(limit)))


def cgroup_cpu_limit(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> float | None:
    """The CPUs per period this process's cgroup may use (the least over it and its ancestors,
    cgroup v1 or v2), None without a limit. Affinity does not show it: a pod limited to 4 CPUs
    on a 64-core node has 64 cores in its affinity, and 64 torch threads there are throttled."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers and "cpu" not in controllers.split(","):
            continue
        mount = Path(root, controllers)  # v2 (no controllers listed): the unified hierarchy's root
        group = mount / path.lstrip("/")
        # up to the mount: a limit on any ancestor holds, and in a container the mount is often
        # its own group while the path names it as the host does
        for folder in [group, *group.parents]:
            if not folder.is_relative_to(mount):
                break
            limits.append(_cpu_quota(folder, v2=not controllers))
    limits = [limit for limit in limits if limit is not None]
    return min(limits, default=None)


def _cpu_quota(folder: Path, v2: bool) -> float | None:
    """A cgroup's CPU quota over its period, None where it sets none (or has no such files)."""
    try:
        if v2:
            quota, period = (folder / "cpu.max").read_text().split()
        else:
            quota, period = ((folder / name).read_text().strip() for name in ("cpu.cfs_quota_us", "cpu.cfs_period_us"))
        return None if quota in ("max", "-1") else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def scheduler_address(cfg: ClusterConfig) -> str | None:
    """The existing scheduler to connect to: ``cluster.address``, else (without a jobqueue cluster)
    Dask's own ``scheduler-address`` setting, as ``Client()`` takes it: ``DASK_SCHEDULER_ADDRESS``,
    which the Dask Kubernetes operator sets in a DaskJob's runner pod."""
    if cfg.address:
        return cfg.address
    return None if cfg.jobqueue is not None else dask.config.get("scheduler-address", None)


def torch_threads_per_worker(cfg: ClusterConfig) -> int:
    """Intra-op threads for torch so that workers x threads never oversubscribe the cores."""
    if scheduler_address(cfg) or cfg.jobqueue:
        return -1  # remote workers size themselves: see geoseg.inference.auto_threads
    return max(1, usable_cores() // (cfg.n_workers * cfg.threads_per_worker))


def jobqueue_cluster(cfg: ClusterConfig):
    """A dask-jobqueue cluster of ``cfg.jobqueue.jobs`` batch jobs."""
    jq = cfg.jobqueue
    assert jq is not None
    try:
        import dask_jobqueue
    except ImportError:
        raise ConfigError("cluster.jobqueue needs dask-jobqueue: pip install 'geoseg[jobqueue]'") from None
    classes = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "sge": "SGECluster", "lsf": "LSFCluster"}
    cluster_class = getattr(dask_jobqueue, classes[jq.kind])
    options = {
        "cores": jq.cores,
        "memory": jq.memory,
        "processes": jq.processes,
        "walltime": jq.walltime,
        "job_extra_directives": jq.job_extra_directives,
        "job_script_prologue": worker_exports(),
    }
    if jq.queue:
        options["queue"] = jq.queue
    if jq.account:
        options["account"] = jq.account
    cluster = cluster_class(**options)
    cluster.scale(jobs=jq.jobs)
    return cluster


@contextmanager
def dask_client(cfg: ClusterConfig) -> Iterator[Client]:
    """Yield a connected client; a LocalCluster started here is closed on exit."""
    address = scheduler_address(cfg)
    if address is None and cfg.jobqueue is not None:
        with jobqueue_cluster(cfg) as cluster, Client(cluster) as client:
            log.info("%s cluster: %d jobs; dashboard %s", cfg.jobqueue.kind, cfg.jobqueue.jobs, client.dashboard_link)
            yield client
        return
    if address:
        client = Client(address, timeout=f"{cfg.connect_timeout_s}s")
        source = "" if cfg.address else ", from DASK_SCHEDULER_ADDRESS"
        log.info("connected to scheduler %s (%d workers%s)", address, len(client.scheduler_info()["workers"]), source)
        try:
            yield client
        finally:
            client.close()
        return
    # the nannies hand the config of this moment to the workers they start
    settings = {"distributed.nanny.pre-spawn-environ": WORKER_ENVIRON, **WORKER_DASK_CONFIG, **SCHEDULER_DASK_CONFIG}
    # they set the workers' environment in their own process, this one, before each spawn: the
    # caller's (a notebook's, the programs it starts) is given back as it was
    caller_environ = {name: os.environ.get(name) for name in [*WORKER_ENVIRON, "PYTHONHASHSEED"]}
    try:
        with dask.config.set(settings):
            cluster = local_cluster(cfg)
    finally:
        restore_environ(caller_environ)
    client = Client(cluster)
    try:
        client.register_plugin(OneLineLogs())
        if cfg.dashboard:
            log.info("Dask dashboard: %s", client.dashboard_link)
        yield client
    finally:
        with suppress(Exception):  # what its workers say from now on is no news
            client.run(cluster_closing)
        client.close()
        with quiet_dask_logs():
            cluster.close()
        restore_environ(caller_environ)  # a worker restarted meanwhile set it again


def restore_environ(values: dict[str, str | None]) -> None:
    """``os.environ`` given the ``values`` (None: unset)."""
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def local_cluster(cfg: ClusterConfig) -> LocalCluster:
    return LocalCluster(
        n_workers=cfg.n_workers,
        threads_per_worker=cfg.threads_per_worker,
        processes=True,
        memory_limit=cfg.memory_limit,
        dashboard_address=":0" if cfg.dashboard else None,
        # without a dashboard the scheduler still serves its health and metrics routes, on
        # port 8787 unless told: a free port, so that two runs on one machine do not collide
        scheduler_kwargs=None if cfg.dashboard else {"dashboard_address": ":0"},
        host="127.0.0.1",
    )
