"""A huge sparse scene: its header claims SIZE x SIZE px, only one PATCH x PATCH px patch is stored.

    python benchmarks/bench_sparse.py [--size 100000] [--patch 1000] [--block 1024] [--workers 2]

Runs ``geoseg run`` (the CLI, demo model and config) on it and prints the wall time, the blocks
computed and left out, and the peak size of OUT sampled every 0.2 s while the run goes on. Then
the same patch in a scene of its own size, for comparison: what the empty rest costs is the
difference. Ends with ``time_s=... peak_out_mb=...`` for the sparse run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

from geoseg.synth import SceneSpec, write_scene

log = logging.getLogger("bench_sparse")
REPO = Path(__file__).resolve().parent.parent


def write_sparse(path: Path, size: int, patch: Path, at: int) -> None:
    """A tiled, sparse uint16 GeoTIFF with nodata 0; only the blocks under ``patch`` are stored."""
    with rasterio.open(patch) as src:
        data, crs = src.read(), src.crs
    profile = dict(
        driver="GTiff", width=size, height=size, count=4, dtype="uint16", nodata=0, crs=crs, tiled=True,
        blockxsize=512, blockysize=512, compress="deflate", sparse_ok=True,
        transform=from_origin(500_000, 5_200_000 + 10 * at, 10, 10),
    )  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data, window=Window(at, at, data.shape[2], data.shape[1]))


def folder_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # removed meanwhile
                total += os.path.getsize(os.path.join(root, name))
    return total


def timed_run(scene: Path, out: Path, block: int, workers: int) -> tuple[float, int, dict]:
    """Wall time, peak OUT bytes and the manifest of one `geoseg run`."""
    argv = [sys.executable, "-m", "geoseg", "run", str(REPO / "configs/demo.yaml"), "-i", str(scene), "--out", str(out)]
    argv += ["--set", f"output.block_size={block}", "--set", f"cluster.n_workers={workers}"]
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.2):
            peak = max(peak, folder_bytes(out))

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    res = subprocess.run(argv, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    done.set()
    sampler.join()
    if res.returncode != 0:
        raise SystemExit(res.stderr)
    peak = max(peak, folder_bytes(out))
    return elapsed, peak, json.loads((out / "manifest.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--patch", type=int, default=1000)
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory(prefix="bench_sparse_") as tmp:
        d = Path(tmp)
        patch = write_scene(SceneSpec(args.patch, args.patch, seed=11, nodata_border=False), d / "patch.tif")[0]
        sparse = d / "sparse.tif"
        write_sparse(sparse, args.size, patch, at=args.size // 2)
        log.info("sparse scene: %d x %d px header, %.1f MB on disk", args.size, args.size, sparse.stat().st_size / 1e6)
        figures = {}
        for name, scene in (("patch alone", patch), ("sparse", sparse)):
            elapsed, peak, manifest = timed_run(scene, d / f"out_{name.replace(' ', '_')}", args.block, args.workers)
            summary = manifest["summary"]
            figures[name] = (elapsed, peak)
            log.info(
                "%-12s %7.1f s  peak OUT %7.1f MB  blocks %d: computed %d, without data %d, tiles %d",
                name,
                elapsed,
                peak / 1e6,
                summary["blocks"],
                summary["computed"],
                summary["without_data"],
                summary["tiles"],
            )
        elapsed, peak = figures["sparse"]
        log.info("sparse / patch alone: %.2fx the time", elapsed / figures["patch alone"][0])
        print(f"time_s={elapsed:.1f} peak_out_mb={np.ceil(peak / 1e5) / 10:.1f}")


if __name__ == "__main__":
    main()
