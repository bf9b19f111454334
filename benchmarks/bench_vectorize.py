"""The vectorize stage against its floor, one core and two workers, side by side in one run.

    python benchmarks/bench_vectorize.py [--size 4096] [--block 1024] [--mmu 0] [--repeat 3]
        [--format gpkg parquet] [--memory-sizes 4096 8192]

The class mosaic is written straight from the synthetic label generator (no model involved).
After one untimed stage on each cluster (each worker's imports, numba's cache loaded, the
mosaic opened: what a worker does once per run), measured, alternating, best of ``--repeat``
each:

- the floor: ``rasterio.features.shapes`` alone over the same blocks, already in memory (in
  this process for one core; one Dask task per block on two workers);
- geoseg's own polygonizer (:func:`geoseg.polygonize.polygonize`: the same polygons, with
  pixel counts and confidence sums) alone over the same blocks, in this process;
- geoseg's whole stage (:func:`geoseg.polygons.stream_polygons`): read the mosaic,
  sieve if ``--mmu``, polygonize, merge the pieces cut by block edges, write the layers
  (GeoPackage and GeoParquet by default), on one worker with one thread and on two workers.

Then the client's memory during the stage (peak RSS above what it held before, sampled every
10 ms) at each of ``--memory-sizes``. The last line is ``ratio=X``: the floor's time over
geoseg's on one core (1.0 would be geoseg at the speed of polygonizing alone).
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from rasterio.crs import CRS
from rasterio.features import shapes

from geoseg import mosaic
from geoseg.blocks import MOSAIC_NAME
from geoseg.cluster import dask_client
from geoseg.config import ClusterConfig, VectorConfig
from geoseg.grid import OutputGrid
from geoseg.polygonize import polygonize
from geoseg.polygons import stream_polygons
from geoseg.synth import SceneSpec, make_labels
from geoseg.tiling import Block, iter_blocks
from geoseg.vector_io import LayerWriter

LEGEND = {i: n for i, n in enumerate(["water", "forest", "grassland", "cropland", "built-up", "bare soil", "road"])}


def build_mosaic(out: Path, size: int, block: int) -> OutputGrid:
    spec = SceneSpec(size, size, seed=3)
    labels = make_labels(spec)
    grid = OutputGrid(CRS.from_user_input(spec.crs).to_wkt(), tuple(spec.transform)[:6], size, size)
    mosaic.create_mosaic(out / MOSAIC_NAME, grid, block, LEGEND)
    for b in iter_blocks(size, size, block):
        part = labels[b.rows.start : b.rows.stop, b.cols.start : b.cols.stop]
        mosaic.write_block(out / MOSAIC_NAME, b, part, (part * 0 + 90).astype("uint8"))
    return grid


def polygon_count(classes: np.ndarray) -> int:
    """The floor's work on one block: GDAL's polygons of its classes, in pixel coordinates."""
    return sum(1 for _ in shapes(classes, mask=classes != 255, connectivity=4))


def block_arrays(work: Path, blocks: list[Block]) -> list[np.ndarray]:
    store = str(work / MOSAIC_NAME)
    return [
        mosaic.read_region(store, slice(b.rows.start, b.rows.stop), slice(b.cols.start, b.cols.stop)) for b in blocks
    ]


def geoseg_stage(client, work: Path, grid: OutputGrid, blocks: list[Block], formats: list[str], mmu: int) -> int:
    writers = [(LayerWriter(work / f"polygons.{fmt}", grid.crs_wkt), None) for fmt in formats]
    return stream_polygons(client, blocks, grid, str(work), LEGEND, writers, VectorConfig(mmu_pixels=mmu))


class PeakRSS:
    """Peak resident memory of this process above its level at start, sampled every 10 ms."""

    def __enter__(self) -> PeakRSS:
        self._process = psutil.Process()
        self.base = self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def rise_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def client_memory(args: argparse.Namespace, size: int) -> None:
    where = args.work / str(size)
    where.mkdir(parents=True, exist_ok=True)
    grid = build_mosaic(where, size, args.block)
    blocks = list(iter_blocks(size, size, args.block))
    warm = args.work / "warm"
    warm.mkdir(parents=True, exist_ok=True)
    warm_grid = build_mosaic(warm, 2 * args.block, args.block)
    with dask_client(ClusterConfig(n_workers=2, threads_per_worker=1, dashboard=False)) as client:
        # imports and first-use caches are not what grows with the scene
        geoseg_stage(
            client, warm, warm_grid, list(iter_blocks(2 * args.block, 2 * args.block, args.block)), args.format, 0
        )
        with PeakRSS() as rss:
            n = geoseg_stage(client, where, grid, blocks, args.format, args.mmu)
    print(f"client memory, {size}x{size} ({n} polygons, two workers): peak RSS +{rss.rise_mb:.0f} MB during the stage")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--mmu", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--format", nargs="+", choices=["gpkg", "parquet"], default=["gpkg", "parquet"])
    parser.add_argument("--memory-sizes", type=int, nargs="*", default=[4096, 8192])
    parser.add_argument("--work", type=Path, default=Path("bench_out") / "vectorize")
    parser.add_argument("--client-memory", type=int, help=argparse.SUPPRESS)  # one size, in a fresh process
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.client_memory:
        client_memory(args, args.client_memory)
        return
    work = args.work / str(args.size)
    work.mkdir(parents=True, exist_ok=True)
    grid = build_mosaic(work, args.size, args.block)
    blocks = list(iter_blocks(args.size, args.size, args.block))
    arrays = block_arrays(work, blocks)
    mpix = args.size * args.size / 1e6
    times: dict[str, list[float]] = {"floor 1": [], "traced 1": [], "geoseg 1": [], "floor 2": [], "geoseg 2": []}
    confidence = [np.full(a.shape, 90, np.uint8) for a in arrays]
    polygonize(arrays[0], 255, confidence[0])  # compiled, or loaded from numba's cache, once
    count = pieces = 0
    one = ClusterConfig(n_workers=1, threads_per_worker=1, dashboard=False)
    two = ClusterConfig(n_workers=2, threads_per_worker=1, dashboard=False)
    with dask_client(one) as client1, dask_client(two) as client2:
        scattered = client2.scatter(arrays)
        for client in (client1, client2):  # untimed: each worker's imports, numba's cache, the mosaic opened
            geoseg_stage(client, work, grid, blocks, args.format, args.mmu)
        for _ in range(args.repeat):  # the machine is noisy: alternate, keep the best of each
            start = time.perf_counter()
            pieces = sum(polygon_count(a) for a in arrays)
            times["floor 1"].append(time.perf_counter() - start)
            start = time.perf_counter()
            for classes, weights in zip(arrays, confidence, strict=True):
                polygonize(classes, 255, weights)
            times["traced 1"].append(time.perf_counter() - start)
            start = time.perf_counter()
            count = geoseg_stage(client1, work, grid, blocks, args.format, args.mmu)
            times["geoseg 1"].append(time.perf_counter() - start)
            start = time.perf_counter()
            client2.gather(client2.map(polygon_count, scattered, pure=False))
            times["floor 2"].append(time.perf_counter() - start)
            start = time.perf_counter()
            geoseg_stage(client2, work, grid, blocks, args.format, args.mmu)
            times["geoseg 2"].append(time.perf_counter() - start)
    best = {name: min(runs) for name, runs in times.items()}
    print(
        f"mosaic {args.size}x{args.size} ({mpix:.1f} Mpix), block {args.block}, {len(blocks)} blocks, mmu {args.mmu}, "
        f"layers {' + '.join(args.format)}: {pieces} block pieces, {count} polygons after the merge"
    )
    print("runs: " + "; ".join(f"{name} {', '.join(f'{t:.2f}' for t in runs)} s" for name, runs in times.items()))
    labels = {
        "floor 1": "floor, one core: rasterio.features.shapes alone",
        "traced 1": "geoseg's polygonizer alone, one core (same polygons, with their pixel and confidence sums)",
        "geoseg 1": "geoseg, one worker thread: read, sieve, polygonize, merge, write",
        "floor 2": "floor, two workers",
        "geoseg 2": "geoseg, two workers",
    }
    for name, seconds in best.items():
        print(f"{seconds:7.2f} s  {mpix / seconds:6.2f} Mpix/s  {labels[name]}")
    print(
        f"two workers / one: floor {best['floor 1'] / best['floor 2']:.2f}x, "
        f"geoseg {best['geoseg 1'] / best['geoseg 2']:.2f}x"
    )
    for size in args.memory_sizes:  # each in a fresh process: a heap grown by earlier runs hides growth
        command = [sys.executable, __file__, "--client-memory", str(size), "--block", str(args.block)]
        subprocess.run(
            [*command, "--mmu", str(args.mmu), "--work", str(args.work), "--format", *args.format], check=True
        )
    print(f"ratio={best['floor 1'] / best['geoseg 1']:.3f}")


if __name__ == "__main__":
    main()
