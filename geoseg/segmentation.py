"""The segmentation stage on a cluster: every block's two steps (:mod:`geoseg.blocks`) as one
Dask graph, their records collected as blocks finish, and partial results dropped once read."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import dask
from dask.delayed import delayed
from distributed import Client, Future, as_completed

from geoseg import mosaic, partials, runstate, storage
from geoseg.blocks import (
    block_graph,
    finish_task,
    has_classes,
    overview_chunk_task,
    overview_graph,
    partials_root,
    polygon_halo,
    predict_task,
    sieve_reach,
    stored_levels_task,
    work_order,
)
from geoseg.config import ClusterConfig, InferenceSettings
from geoseg.mosaic import MOSAIC_NAME
from geoseg.planning import RunPlan
from geoseg.polygons import LayerSink
from geoseg.progress import track
from geoseg.runstate import Lease, RunError
from geoseg.scenes import SceneInfo
from geoseg.tiling import Block, reaching_blocks

log = logging.getLogger(__name__)


def step_one_resources(cluster: ClusterConfig) -> dict[str, float] | None:
    """What a step-1 task asks of its worker: a GPU where the cluster says so."""
    return {"GPU": 1} if cluster.gpu_resource else None


def step_one_workers(client: Client, resources: dict[str, float] | None) -> list[str]:
    """The workers that run step 1 (all, or those declaring ``resources``), once one has joined
    (a batch job's workers may still be starting). One line where ``resources`` are asked and
    no worker declares them: the blocks would wait forever."""
    if not client.scheduler_info(n_workers=-1)["workers"]:
        client.wait_for_workers(1)
    slots = worker_slots(client, resources)
    if resources and not any(slots.values()):
        raise RunError(
            f"cluster.gpu_resource is set, but none of the cluster's {len(slots)} workers declares a GPU: "
            "start them with `dask worker ... --resources GPU=1`"
        )
    return [addr for addr, n in slots.items() if n > 0]


def _numerics(settings: InferenceSettings) -> str:
    """:func:`geoseg.inference.numerics` on a worker: the client imports no torch."""
    from geoseg.inference import numerics

    return numerics(settings)


def workers_numerics(client: Client, settings: InferenceSettings, resources: dict[str, float] | None) -> str:
    """How the workers that run step 1 compute votes (:func:`geoseg.inference.numerics`), asked
    of them, since "auto" resolves on each worker. They must agree: a block's votes are summed
    with its neighbours', so one mosaic cannot mix a CPU's and a GPU's. Workers that join later
    are checked by each block (:func:`geoseg.blocks.predict_task`)."""
    try:
        found = client.run(_numerics, settings, workers=step_one_workers(client, resources))
    except RuntimeError as exc:  # model.device=cuda where a worker sees no CUDA device
        raise RunError(str(exc)) from None
    kinds = sorted(set(found.values()))
    if len(kinds) > 1:
        counts = ", ".join(f"{kind} on {sum(v == kind for v in found.values())}" for kind in kinds)
        raise RunError(
            f"the workers compute votes differently ({counts} workers), and a block's votes are summed with its "
            "neighbours': set model.device, or give the GPU workers `--resources GPU=1` and set cluster.gpu_resource"
        )
    return kinds[0]


def check_workers_see_output(client: Client, out: str, run_id: str) -> None:
    """Every worker must find this run's lease at OUT: one that sees another store, no store (no
    credentials), or a local folder of another machine would fail every block it gets."""
    seen = client.run(runstate.lease_as_seen, out, run_id)
    blind = {addr: why for addr, why in seen.items() if why}
    if blind:
        addr, why = next(iter(blind.items()))
        raise RunError(
            f"{len(blind)} of {len(seen)} workers cannot use {out}: worker {addr} finds {why} at "
            f"{runstate.state(out, runstate.LEASE_NAME)}; give the workers this process's storage "
            "settings and credentials, and an OUT they all reach"
        )


def worker_slots(client: Client, resources: dict[str, float] | None) -> dict[str, int]:
    """How many step-1 tasks each worker runs at once: its threads, or its units of ``resources``."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    if not resources:
        return {addr: w["nthreads"] for addr, w in workers.items()}
    return {
        addr: min(int(w.get("resources", {}).get(name, 0) // need) for name, need in resources.items())
        for addr, w in workers.items()
    }


@dataclass
class SubmittedBlocks:
    """The blocks' tasks on the cluster, as :func:`submit_blocks` left them."""

    step2_of: dict[str, Future]  # block key -> its step 2 (its record), for each block to do
    parts: dict[str, Future]  # block key -> its polygons, once it is final (when asked for)
    reach: dict[str, list[Block]]  # block key -> the blocks whose step 1 it reads, itself first
    readers: dict[str, int]  # block key -> how many step 2 read its partial results
    overviews: dict[str, Future]  # "overviews/<f>/<i>_<j>" -> the task writing that chunk
    partials_at: str  # where the step-1 results lie (:func:`geoseg.blocks.partials_root`)
    finished_at: float = 0.0  # perf_counter() when collect_blocks had the last block's record


def submit_blocks(
    client: Client,
    blocks: list[Block],
    todo: list[Block],
    layers: dict[str, dict[str, list[SceneInfo]]],
    plan: RunPlan,
    settings: InferenceSettings,
    lease: Lease,
    n_classes: int,
    polygonize: Callable[..., Any] | None = None,
    reused: dict[str, dict[str, Any]] | None = None,
    all_overviews: bool = False,
) -> SubmittedBlocks:
    """Step 1 and step 2 of every block in ``todo`` on the cluster (whose step-1 workers
    :func:`workers_numerics` checked for ``plan``), and with ``polygonize``
    (:func:`geoseg.blocks.polygonize_task` with the run's arguments bound) each block's polygons
    as soon as the block and the blocks its sieve reads are final; the overview chunks they
    fall in once their blocks are final (:func:`geoseg.blocks.overview_graph`; ``reused``: the
    records of blocks committed before; ``all_overviews``: also every chunk without a marker,
    as a resumed run must write them); :func:`collect_blocks` waits.

    Every task is submitted at once and Dask places them: step 1 for the blocks to do and the
    blocks whose tiles reach them, with priorities in :func:`work_order`, and each block's step 2
    right after the last step 1 it needs, so only about one row of blocks needs its partial
    results at any time; on disk a partial is deleted once every block that reads it is
    finished (on a store, all of them at the run's end).
    Dask's queuing hands step 1 to worker threads as they free up, and to workers that join a
    running job at once. It does not queue tasks that ask for a GPU resource: it places those
    on the GPU workers there are. An own hand-out loop was no more than 2 % faster at 32 blocks
    per worker thread (benchmarks/README.md). ``layers`` are the scenes each block composites
    (:func:`geoseg.blocks.scene_layers`); a block without any has no valid pixel within a tile
    of it: its tiles add no votes anywhere, so it is neither computed nor read. Task keys hold
    the run's id (runs sharing a scheduler never share a task).
    """
    grid, tiling, out, cfg = plan.grid, plan.tiling, plan.out, plan.cfg
    empty = {key for key, scene_sets in layers.items() if not scene_sets}
    by_index = {(b.row, b.col): b for b in blocks}
    order = {b.key: n for n, b in enumerate(work_order(blocks, grid, tiling))}
    tg, sup, size = tiling.grid, tiling.support, tiling.block_size
    reach = {  # the block itself first: its step 1 holds the interior
        b.key: [b]
        + [
            by_index[(r, c)]
            for r in reaching_blocks(tg, b.row, size, grid.height, sup)
            for c in reaching_blocks(tg, b.col, size, grid.width, sup)
            if (r, c) != (b.row, b.col) and by_index[(r, c)].key not in empty
        ]
        for b in todo
    }
    needed = sorted({n.key: n for b in todo for n in reach[b.key]}.values(), key=lambda n: order[n.key])
    readers: dict[str, int] = {}
    for b in todo:
        for n in reach[b.key]:
            readers[n.key] = readers.get(n.key, 0) + 1
    tag = f"{plan.fingerprint}-{lease.run_id}"
    resources = step_one_resources(cfg.cluster)  # the workers that declare them: see workers_numerics
    partials_at = partials_root(str(out), plan.fingerprint)
    predict = partial(
        predict_task,
        grid=grid,
        tiling=tiling,
        settings=settings,
        partials_at=partials_at,
        read_threads=cfg.cluster.read_threads,
        numerics=plan.numerics,
    )
    finish = partial(finish_task, n_classes=n_classes, out=str(out), partials_at=partials_at, run_id=lease.run_id)
    sieved = {}
    if polygonize is not None:  # each block's polygons wait for the blocks to do that its sieve reads
        halo, todo_keys = polygon_halo(cfg.vector), {b.key for b in todo}
        sieved = {
            b.key: [n for n in sieve_reach(b, by_index, halo, size) if n is b or n.key in todo_keys] for b in todo
        }
    from_memory = polygon_halo(cfg.vector) == 0
    step2, parts, finished = block_graph(
        needed, todo, reach, order, layers, predict, finish, tag, resources, polygonize, sieved, from_memory
    )
    reused = reused or {}
    with_classes = {key for key, record in reused.items() if has_classes(record)}

    def stored(b: Block):
        if b.key not in with_classes:
            return None
        with dask.annotate(priority=-2 * len(order) - 2):  # after every step 1: the model comes first
            return delayed(stored_levels_task, pure=False)(
                b, str(out), lease.run_id, dask_key_name=f"levels-{tag}-{b.key}"
            )

    write_chunk = partial(overview_chunk_task, out=str(out), run_id=lease.run_id)
    factors = mosaic.overview_factors_of(storage.join(out, MOSAIC_NAME))
    # a chunk as urgent as its last block's step 2: its windows are not held longer than needed
    due = {b.key: -2 * max(order[n.key] for n in reach[b.key]) - 1 for b in todo}
    written = runstate.written_overview_chunks(str(out)) if all_overviews else None

    def unwritten(name: str) -> bool:  # by an earlier run that stopped after the chunk's blocks
        return written is not None and name not in written

    chunks = overview_graph(blocks, finished, stored, factors, size, unwritten, write_chunk, tag, due)
    if written:
        runstate.forget_overview_chunks(str(out), [name for name in chunks if name in written])
    # One submission: the scheduler sees every step 1 at once and queues them (it assigns the
    # first few of a group submitted task by task before it knows the group is large).
    futures = client.compute([*step2, *parts, *chunks.values()], optimize_graph=False)
    n_step2, n_parts = len(step2), len(parts)
    return SubmittedBlocks(
        {b.key: fut for b, fut in zip(todo, futures[:n_step2], strict=True)},
        {b.key: fut for b, fut in zip(todo, futures[n_step2 : n_step2 + n_parts], strict=False)},
        reach,
        readers,
        dict(zip(chunks, futures[n_step2 + n_parts :], strict=True)),
        partials_at,
    )


def collect_blocks(
    submitted: SubmittedBlocks, out: str, lease: Lease, sink: LayerSink | None = None
) -> dict[str, dict[str, Any]]:
    """The records of the submitted blocks as they finish; each block's partial results are
    deleted once every block that reads them is finished (on disk: on a store, the run deletes
    them all at its end). The polygon layers of ``sink`` are written as they finish meanwhile
    (the client would otherwise only wait)."""
    records: dict[str, dict[str, Any]] = {}
    readers = dict(submitted.readers)
    layers = sink.layers if sink is not None else []
    step2 = set(submitted.step2_of.values())
    description = "segmenting blocks" + (", polygons" if layers else "")
    chunk_of = {fut.key: name for name, fut in submitted.overviews.items()}
    tasks = [*submitted.step2_of.values(), *layers, *submitted.overviews.values()]
    polygon_error: BaseException | None = None
    finished_blocks = 0  # counted, not summed over the records each time (10,000 blocks: 50M lookups)
    for fut in track(as_completed(tasks), total=len(tasks), description=description):
        lease.check()
        if fut.key in chunk_of:  # failed: in the records as a failed block is (a rerun writes it)
            if fut.status == "error":
                exc = fut.exception()
                records[chunk_of[fut.key]] = {
                    "status": "failed",
                    "error": runstate.error_text(exc),
                }
                log.error("overview chunk %s failed: %s", chunk_of[fut.key], records[chunk_of[fut.key]]["error"])
            fut.release()
            continue
        if fut not in step2:
            try:
                sink.add(fut)
            except Exception as exc:  # the blocks still finish and commit (a rerun resumes)
                polygon_error = polygon_error or exc
            continue
        rec = dict(fut.result())
        key = rec.pop("block")
        records[key] = rec
        if rec["status"] != "done":  # said when it happens, not after hours of other blocks
            log.error("block %s failed: %s", key, rec["error"])
        finished_blocks += 1
        fut.release()
        for n in submitted.reach[key]:
            readers[n.key] -= 1
            # on a store, space is not short and a removal costs three requests: the run
            # removes them all at its end, in one listing
            if readers[n.key] == 0 and not storage.is_url(out):
                partials.discard(storage.join(submitted.partials_at, n.key))
        if finished_blocks == len(step2):
            submitted.finished_at = time.perf_counter()
    submitted.finished_at = submitted.finished_at or time.perf_counter()
    if polygon_error is not None:
        raise polygon_error
    return records


def empty_scenes(scenes: list[SceneInfo], records: dict[str, dict]) -> dict[str, str | None]:
    """Scenes that gave no pixel: all nodata (an error), or never read as earlier scenes covered them (None)."""
    valid: dict[str, int] = {}
    filled: dict[str, int] = {}
    for rec in records.values():
        for path, (n_valid, n_filled) in rec.get("scene_valid_pixels", {}).items():
            valid[path] = valid.get(path, 0) + n_valid
            filled[path] = filled.get(path, 0) + n_filled
    if any(rec.get("status") == "done" and "scene_valid_pixels" not in rec for rec in records.values()):
        return {}  # blocks from an older run carry no counts: no verdict
    if any(rec.get("status") != "done" for rec in records.values()):
        return {}  # a failed block read scenes it did not count: they are not "unused"
    verdicts: dict[str, str | None] = {}
    for s in scenes:
        name = storage.record_name(s.path)  # as the blocks' records name it
        if name in valid and valid[name] == 0:
            verdicts[s.path] = "all pixels are nodata"
        elif filled.get(name, 0) == 0:
            verdicts[s.path] = None
    return verdicts
