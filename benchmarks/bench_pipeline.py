"""End-to-end pipeline throughput beside the model-bound throughput, measured in one run.

    python benchmarks/bench_pipeline.py [--size 4096] [--workers CORES] [--block 2048] [--peer]
        [--device cuda [--no-amp] [--compile] [--threads-per-worker 2]] [--polygons]

1. the pipeline (read GeoTIFF -> tiles -> forward -> blend -> argmax -> Zarr) on a Dask
   LocalCluster, after a warm-up run that loads the model in the workers;
2. the model-bound ceiling: forward passes alone over the same number of tiles with the same
   batch size, on tiles already in memory, split evenly over the same workers with the same
   torch threads (one Dask task per worker, all at once), with the workers' own model (compiled
   once where ``--compile``); also, on CPU and for reference, the same passes in this process
   with all the cores as torch threads. On a GPU the passes leave their votes on the device,
   as the pipeline's do, and the time is taken after the device has finished;
3. optionally (--peer) MONAI's sliding_window_inference (gaussian, same model, tile,
   overlap and batch) on the scene already in memory;
4. optionally (--polygons) the pipeline again with its polygons (polygonized on the workers
   while blocks are segmented, merged and written at the end), to print what they add.

Each is run ``--repeat`` times, alternating, and the best of each is kept (medians are
printed too).

All of them run with the workers' allocator settings (the script re-executes itself with
them). Prints Mpix/s for each, peak RSS of the worker, the overlap cost, and ends with ``ratio=X.XXX``
(model-bound time / pipeline time, the best run of each). Scene pixels count the whole grid, nodata included.
The best pipeline run is also split, from its task stream, into the workers' time in step 1, in step 2 and idle.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from distributed import get_task_stream

from geoseg import storage
from geoseg.blending import fixed_window
from geoseg.cluster import dask_client, with_malloc_tunables
from geoseg.config import ClusterConfig, load_config
from geoseg.inference import InferenceSettings, fuse_batch_norms, get_predictor
from geoseg.jobs import run
from geoseg.models import build_model, save_checkpoint
from geoseg.models.checkpoint import load_checkpoint
from geoseg.synth import SceneSpec, write_scene


def with_worker_allocator() -> None:
    """Re-run this script with the workers' malloc settings, so that the model-bound and MONAI
    passes in this process get the same allocator as the pipeline's workers (a fair ratio)."""
    current = os.environ.get("GLIBC_TUNABLES", "")
    wanted = with_malloc_tunables(current)
    if wanted != current:
        env = {**os.environ, "GLIBC_TUNABLES": wanted}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def worker_peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def model_bound_seconds(settings: InferenceSettings, n_tiles: int, tile: int, overlap: int) -> float:
    """Forward passes over ``n_tiles`` random tiles with ``settings`` (the pipeline's own, so that
    a worker reuses its model, compiled or not), timed until the device has finished."""
    predictor = get_predictor(settings)
    batch = predictor.batch_size(tile)
    tiles = np.random.default_rng(0).standard_normal((batch, 4, tile, tile)).astype(np.float32)
    window = fixed_window("gaussian", tile, overlap)
    cuda = predictor.device.type == "cuda"

    def passes(count: int) -> None:
        for done in range(0, count, batch):
            part = tiles[: min(batch, count - done)]
            if cuda:  # the votes stay on the device, as in the pipeline
                predictor.device_votes(part, window)
            else:
                predictor.probabilities(part)
        if cuda:
            torch.cuda.synchronize(predictor.device)

    passes(batch)  # warm-up (and, where compiled, the compilation for this shape)
    start = time.perf_counter()
    passes(n_tiles)
    return time.perf_counter() - start


def model_bound_in_workers(client, settings: InferenceSettings, n_tiles: int, tile: int, overlap: int) -> float:
    """The same forward passes split evenly over the workers, one Dask task each, all at once:
    the ceiling with the workers' own processes and threads (the slowest worker's time)."""
    workers = sorted(client.scheduler_info()["workers"])
    shares = [len(part) for part in np.array_split(np.arange(n_tiles), len(workers))]
    futures = [
        client.submit(model_bound_seconds, settings, share, tile, overlap, workers=[w], pure=False)
        for w, share in zip(workers, shares, strict=True)
    ]
    return max(client.gather(futures))


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def task_seconds(stream: list[dict]) -> dict[str, float]:
    """Seconds the workers spent computing each kind of task (``predict``, ``finish``) in a task stream."""
    seconds: dict[str, float] = {}
    for task in stream:
        kind = str(task["key"]).split("-", 1)[0]
        for span in task["startstops"]:
            if span["action"] == "compute":
                seconds[kind] = seconds.get(kind, 0.0) + span["stop"] - span["start"]
    return seconds


def random_checkpoint(arch: str, work: Path) -> str:
    """A checkpoint of ``arch`` with random weights and the demo model's bands, classes and
    statistics: what a forward pass costs depends on the architecture, not on the weights."""
    path = work / f"random-{arch}.safetensors"
    if not path.exists():
        demo = load_checkpoint("builtin:demo")
        torch.manual_seed(0)
        model = build_model(arch, len(demo.bands), demo.n_classes)
        save_checkpoint(replace(demo, arch=arch, arch_kwargs={}, extra={}, state_dict={}), model, path)
    return str(path)


def monai_seconds(checkpoint: str, scene: Path, tile: int, overlap: int, batch: int, threads: int) -> float:
    import rasterio
    from monai.inferers import sliding_window_inference

    torch.set_num_threads(threads)
    ckpt = load_checkpoint(checkpoint)
    model = ckpt.build()
    fuse_batch_norms(model)  # the same model and layout geoseg runs
    model = model.to(memory_format=torch.channels_last)
    with rasterio.open(scene) as src:
        image = src.read().astype(np.float32)
    mean = np.asarray(ckpt.mean, np.float32)[:, None, None]
    std = np.asarray(ckpt.std, np.float32)[:, None, None]
    x = torch.from_numpy((image - mean) / std)[None].contiguous(memory_format=torch.channels_last)
    start = time.perf_counter()
    with torch.inference_mode():
        logits = sliding_window_inference(x, (tile, tile), batch, model, overlap=overlap / tile, mode="gaussian")
        logits.argmax(1)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--block", type=int, default=2048)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--overlap", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="default: one per core")
    parser.add_argument("--threads-per-worker", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="mixed precision (CUDA)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model in each worker")
    parser.add_argument("--checkpoint", default="builtin:demo")
    parser.add_argument("--arch", help="time this architecture with random weights instead of --checkpoint")
    parser.add_argument("--peer", action="store_true", help="also time MONAI sliding_window_inference")
    parser.add_argument("--polygons", action="store_true", help="also time the pipeline with its polygons")
    parser.add_argument("--repeat", type=int, default=2, help="alternate pipeline and model-bound; keep the best")
    parser.add_argument("--work", type=Path, default=Path("bench_out"))
    args = parser.parse_args()
    with_worker_allocator()
    logging.basicConfig(level=logging.WARNING)
    args.work.mkdir(parents=True, exist_ok=True)
    scene = args.work / f"scene_{args.size}.tif"
    if not scene.exists():
        write_scene(SceneSpec(args.size, args.size, seed=7), scene)
    if args.arch:
        args.checkpoint = random_checkpoint(args.arch, args.work)
    warm = args.work / "warm.tif"
    if not warm.exists():
        write_scene(SceneSpec(300, 300, seed=8), warm)
    cores = os.cpu_count() or 1
    threads = max(1, cores // (args.workers * args.threads_per_worker))
    overrides = [
        f"model.device={args.device}",
        f"model.amp={str(args.amp).lower()}",
        f"model.compile={str(args.compile).lower()}",
        f"cluster.threads_per_worker={args.threads_per_worker}",
        f"model.checkpoint={args.checkpoint}",
        f"model.batch_size={args.batch}",
        f"tiling.tile_size={args.tile}",
        f"tiling.overlap={args.overlap}",
        f"output.block_size={args.block}",
        "output.polygons=false",
        "output.overwrite=true",
        f"cluster.n_workers={args.workers}",
    ]
    cluster = ClusterConfig(n_workers=args.workers, threads_per_worker=args.threads_per_worker, dashboard=False)
    with dask_client(cluster) as client:
        run(load_config(None, [*overrides, f"inputs=[{str(warm)!r}]", f"out={str(args.work / 'warm_out')!r}"]), client)
        cfg = load_config(None, [*overrides, f"inputs=[{str(scene)!r}]", f"out={str(args.work / 'out')!r}"])
        ckpt_path = load_checkpoint(args.checkpoint).path
        # the pipeline's own settings: the workers' model (compiled where asked) is reused
        settings = InferenceSettings(
            storage.absolute(ckpt_path), args.batch, args.device, args.amp, threads, args.compile
        )
        on_cpu = InferenceSettings(ckpt_path, args.batch, "cpu", False, cores)
        # The machine is noisy: alternate the measurements and keep the best of each.
        times: dict[str, list[float]] = {"pipeline": [], "workers": [], "process": [], "monai": [], "polygons": []}
        with_polygons = load_config(
            None,
            [*overrides, "output.polygons=true", f"inputs=[{str(scene)!r}]", f"out={str(args.work / 'out_poly')!r}"],
        )
        splits: list[dict[str, float]] = []  # per pipeline run: worker seconds of each kind of task
        forward: list[float] = []  # per pipeline run: worker seconds in forward passes (manifest)
        for _ in range(args.repeat):
            with get_task_stream(client) as stream:
                start = time.perf_counter()
                result = run(cfg, client)
                times["pipeline"].append(time.perf_counter() - start)
            splits.append(task_seconds(stream.data))
            manifest = json.loads(Path(result.manifest).read_text())
            n_tiles = manifest["summary"]["tiles"]
            forward.append(manifest["timings"]["forward_s"])
            times["workers"].append(model_bound_in_workers(client, settings, n_tiles, args.tile, args.overlap))
            if args.device == "cpu":
                times["process"].append(model_bound_seconds(on_cpu, n_tiles, args.tile, args.overlap))
            if args.peer:
                times["monai"].append(monai_seconds(ckpt_path, scene, args.tile, args.overlap, args.batch, cores))
            if args.polygons:
                start = time.perf_counter()
                run(with_polygons, client)
                times["polygons"].append(time.perf_counter() - start)
        rss = client.run(worker_peak_rss_mb)
    best = {name: min(runs) for name, runs in times.items() if runs}
    mpix = args.size * args.size / 1e6
    no_overlap_tiles = int(np.ceil(args.size / args.tile) ** 2)
    print(
        f"scene {args.size}x{args.size} ({mpix:.1f} Mpix), block {args.block}, tile {args.tile}, overlap "
        f"{args.overlap}, batch {args.batch}, workers {args.workers} x {threads} torch threads, "
        f"model {args.arch or args.checkpoint}, device {device_name(args.device)}, "
        f"amp {args.amp and args.device == 'cuda'}, compile {args.compile}"
    )
    print(
        f"tiles computed {n_tiles}, without overlap {no_overlap_tiles}, overlap cost {n_tiles / no_overlap_tiles:.3f}"
    )
    print(
        "runs: " + "; ".join(f"{name} {', '.join(f'{t:.2f}' for t in runs)} s" for name, runs in times.items() if runs)
    )
    labels = {
        "pipeline": "pipeline (read, forward, blend, argmax, Zarr)",
        "workers": "model-bound: forward passes alone, same tiles split evenly over the same workers and threads",
        "process": f"forward passes alone, same tiles, one process with {cores} torch threads",
        "monai": "MONAI sliding_window_inference, image in memory",
        "polygons": "pipeline with its polygons (GeoPackage)",
    }
    for name, seconds in best.items():
        print(f"{seconds:8.2f} s  {mpix / seconds:7.3f} Mpix/s  {labels[name]}")
    mid = {name: float(np.median(runs)) for name, runs in times.items() if runs}
    print(f"medians: model-bound / pipeline {mid['workers'] / mid['pipeline']:.3f}", end="")
    print(f", geoseg / MONAI {mid['pipeline'] / mid['monai']:.3f}" if args.peer else "")
    if "process" in best:
        print(f"one-process passes / pipeline {best['process'] / best['pipeline']:.3f}")
    if "polygons" in best:
        print(
            f"polygons add {best['polygons'] / best['pipeline'] - 1:+.1%} (best runs), "
            f"{mid['polygons'] / mid['pipeline'] - 1:+.1%} (medians) to the pipeline's time without them"
        )
    fastest = int(np.argmin(times["pipeline"]))
    tasks = splits[fastest]
    ceiling_share = int(np.ceil(n_tiles / args.workers))  # tiles of the busiest worker in the ceiling
    print(
        f"forward passes per tile: {forward[fastest] / n_tiles * 1e3:.1f} ms in the best pipeline run, "
        f"{best['workers'] / ceiling_share * 1e3:.1f} ms model-bound"
    )
    capacity = best["pipeline"] * args.workers * args.threads_per_worker  # task threads x time
    print(
        f"best pipeline run, worker time: step 1 {tasks.get('predict', 0) / capacity:.1%}, "
        f"step 2 {tasks.get('finish', 0) / capacity:.1%}, idle {1 - sum(tasks.values()) / capacity:.1%} "
        "(start-up, hand-out, the uneven last blocks)"
    )
    print(f"worker peak RSS: {', '.join(f'{v:.0f} MB' for v in rss.values())}")
    if args.peer:
        print(f"geoseg/MONAI time ratio {best['pipeline'] / best['monai']:.3f}")
    print(f"ratio={best['workers'] / best['pipeline']:.3f}")


if __name__ == "__main__":
    main()
