"""Peak RSS of a worker against scene size, at a fixed block and batch size (invariant 4).

    python benchmarks/bench_memory.py [--sizes 2048 4096 8192] [--block 1024]

Each size runs in a fresh one-worker LocalCluster, so each peak belongs to that run alone.
The last line is ``flat=X.XXX``: the largest scene's peak over the smallest's.
"""

from __future__ import annotations

import argparse
import logging
import resource
import time
from pathlib import Path

from geoseg.cluster import dask_client
from geoseg.config import ClusterConfig, load_config
from geoseg.jobs import run
from geoseg.synth import SceneSpec, write_scene


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--checkpoint", default="builtin:demo")
    parser.add_argument("--work", type=Path, default=Path("bench_out"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.work.mkdir(parents=True, exist_ok=True)
    peaks = {}
    for size in args.sizes:
        scene = args.work / f"scene_{size}.tif"
        if not scene.exists():
            write_scene(SceneSpec(size, size, seed=7), scene)
        cfg = load_config(
            None,
            [
                f"model.checkpoint={args.checkpoint}",
                f"model.batch_size={args.batch}",
                f"output.block_size={args.block}",
                "output.polygons=false",
                "output.overwrite=true",
                f"inputs=[{str(scene)!r}]",
                f"out={str(args.work / f'mem_{size}')!r}",
            ],
        )
        with dask_client(ClusterConfig(n_workers=1, dashboard=False)) as client:
            start = time.perf_counter()
            run(cfg, client)
            seconds = time.perf_counter() - start
            peaks[size] = max(client.run(peak_rss_mb).values())
        print(
            f"scene {size:>5} px: worker peak RSS {peaks[size]:7.0f} MB  ({seconds:.1f} s, "
            f"{size * size / 1e6 / seconds:.3f} Mpix/s)"
        )
    print(f"flat={peaks[max(peaks)] / peaks[min(peaks)]:.3f}")


if __name__ == "__main__":
    main()
