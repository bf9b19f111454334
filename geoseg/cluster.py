"""Dask client: a LocalCluster by default, or an existing scheduler's address."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from distributed import Client, LocalCluster

from geoseg.config import ClusterConfig

log = logging.getLogger(__name__)


def torch_threads_per_worker(cfg: ClusterConfig) -> int:
    """Intra-op threads for torch so that workers x threads never oversubscribe the cores."""
    if cfg.address:
        return 0  # remote workers size themselves
    cores = os.cpu_count() or 1
    return max(1, cores // (cfg.n_workers * cfg.threads_per_worker))


@contextmanager
def dask_client(cfg: ClusterConfig) -> Iterator[Client]:
    """Yield a connected client; a LocalCluster started here is closed on exit."""
    if cfg.address:
        client = Client(cfg.address, timeout="30s")
        log.info("connected to scheduler %s (%d workers)", cfg.address, len(client.scheduler_info()["workers"]))
        try:
            yield client
        finally:
            client.close()
        return
    cluster = LocalCluster(
        n_workers=cfg.n_workers,
        threads_per_worker=cfg.threads_per_worker,
        processes=True,
        memory_limit=cfg.memory_limit,
        dashboard_address=":0" if cfg.dashboard else None,
        host="127.0.0.1",
    )
    client = Client(cluster)
    if cfg.dashboard:
        log.info("Dask dashboard: %s", client.dashboard_link)
    try:
        yield client
    finally:
        client.close()
        cluster.close()
