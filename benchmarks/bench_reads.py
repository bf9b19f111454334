"""How fast the reader threads feed the model: every block's tile rows of a scene, no forward pass.

    python benchmarks/bench_reads.py [--size 4096] [--block 1024] [--threads 1 2] [--repeat 3] [--band-assets]

Reads (decode, composite, validity, normalise) the tile rows of every block of the output
grid, as step 1 does, with each number of reader threads in turn (alternating, best of
``--repeat`` kept), in this process with the workers' allocator and GDAL settings. On a GPU
the forward passes cost next to nothing on the host, so this is the pipeline's ceiling there:
compare it with the model's Mpix/s on the device. The last line is ``speedup=X.XXX``: the most
threads against one.

With ``--band-assets`` the same pixels are also read as a STAC item with one COG per band (the
Sentinel-2 layout, stacked by a VRT; geoseg.band_assets), alternating with the stacked file,
and the item's rate is printed against the file's for each number of threads.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

from geoseg.cluster import WORKER_ENVIRON
from geoseg.grid import grid_from_scenes
from geoseg.inference import InferenceSettings, Predictor
from geoseg.models.checkpoint import load_checkpoint
from geoseg.scenes import SceneInfo, open_scene
from geoseg.segment import TilingSettings, read_tile_rows
from geoseg.synth import SceneSpec, write_scene
from geoseg.tiling import iter_blocks


def with_worker_environ() -> None:
    """Re-run this script with the workers' environment (GDAL's cache, malloc settings)."""
    if any(os.environ.get(k) != v for k, v in WORKER_ENVIRON.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **WORKER_ENVIRON})


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--overlap", type=int, default=32)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("bench_out"))
    parser.add_argument("--band-assets", action="store_true", help="also read a per-band-asset STAC item")
    args = parser.parse_args()
    with_worker_environ()
    args.work.mkdir(parents=True, exist_ok=True)
    path = args.work / f"scene_{args.size}.tif"
    if not path.exists():
        write_scene(SceneSpec(args.size, args.size, seed=7), path)
    scene = open_scene(path)
    item = band_asset_item(path, args.work) if args.band_assets else None
    grid = grid_from_scenes([scene])
    tiling = TilingSettings(args.tile, args.overlap, "gaussian", args.block)
    predictor = Predictor(load_checkpoint("builtin:demo"), InferenceSettings("builtin:demo", device="cpu"))
    blocks = list(iter_blocks(grid.height, grid.width, args.block))

    def read_all(threads: int, source: SceneInfo = scene) -> tuple[float, float]:
        start, cpu = time.perf_counter(), cpu_seconds()
        for block in blocks:
            rows, cols = tiling.ownership(block, grid)
            span = tiling.grid.read_span(cols.owned)
            for _ in read_tile_rows([source], grid, tiling.grid, rows.owned, span, predictor, {}, threads):
                pass
        return time.perf_counter() - start, cpu_seconds() - cpu

    read_all(1)  # warm the page cache
    runs: dict[int, list[tuple[float, float]]] = {n: [] for n in args.threads}
    item_runs: dict[int, list[tuple[float, float]]] = {n: [] for n in args.threads}
    if item is not None:
        read_all(1, item)
    for _ in range(args.repeat):
        for n in args.threads:
            runs[n].append(read_all(n))
            if item is not None:
                item_runs[n].append(read_all(n, item))
    mpix = args.size * args.size / 1e6
    print(
        f"scene {args.size}x{args.size} ({mpix:.1f} Mpix, {scene.dtype} x {scene.count}, {scene.block_rows}-row blocks)"
    )
    print(f"block {args.block}, tile {args.tile}, overlap {args.overlap}, {os.cpu_count()} cores")
    best = {n: min(r) for n, r in runs.items()}
    for n, (wall, cpu) in best.items():
        print(
            f"{n:2d} reader threads: {wall:6.2f} s  {mpix / wall:6.1f} Mpix/s  ({cpu / mpix * 1e3:.1f} ms CPU per Mpix)"
        )
    if item is not None:
        for n, timings in item_runs.items():
            wall, cpu = min(timings)
            print(
                f"{n:2d} reader threads, STAC item of 4 band COGs: {wall:6.2f} s  {mpix / wall:6.1f} Mpix/s "
                f"({cpu / mpix * 1e3:.1f} ms CPU per Mpix), {best[n][0] / wall:.2f}x the stacked file"
            )
    most = max(args.threads)
    print(f"speedup={best[min(args.threads)][0] / best[most][0]:.3f}")


def band_asset_item(stacked: Path, work: Path) -> SceneInfo:
    """The stacked scene's bands as one COG each, in a STAC item; opened as geoseg opens one."""
    import json

    import rasterio

    from geoseg.scenes import BandSelection

    folder = work / f"{stacked.stem}_bands"
    folder.mkdir(parents=True, exist_ok=True)
    assets = {}
    with rasterio.open(stacked) as src:
        profile = {**src.profile, "count": 1}
        for index, name in enumerate(src.descriptions, start=1):
            target = folder / f"{name}.tif"
            if not target.exists():
                with rasterio.open(target, "w", **profile) as dst:
                    dst.write(src.read(index), 1)
            assets[f"B{index}"] = {"href": target.name, "eo:bands": [{"name": f"B{index}", "common_name": name}]}
    item = {"type": "Feature", "stac_version": "1.1.0", "id": "bench", "properties": {}, "assets": assets}
    (folder / "item.json").write_text(json.dumps(item))
    names = tuple(load_checkpoint("builtin:demo").bands)
    return open_scene(f"{folder / 'item.json'}#bench", selection=BandSelection(names=names))


if __name__ == "__main__":
    main()
