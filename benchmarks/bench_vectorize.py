"""Vectorize throughput (Mpix/s, polygons/s) of a large class mosaic, one worker vs two.

    python benchmarks/bench_vectorize.py [--size 4096] [--block 1024] [--mmu 9] [--format gpkg|parquet]

The mosaic is written straight from the synthetic label generator (no model involved), so
the figure is the vectorize stage's alone: per-block polygonize on the workers, then the
merge of polygons cut by block edges in the client.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from rasterio.crs import CRS

from geoseg import mosaic
from geoseg.blocks import MOSAIC_NAME
from geoseg.cluster import dask_client
from geoseg.config import ClusterConfig, VectorConfig
from geoseg.grid import OutputGrid
from geoseg.synth import SceneSpec, make_labels
from geoseg.tiling import iter_blocks
from geoseg.vector_io import LayerWriter
from pipelines.segment_scenes import stream_polygons

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--mmu", type=int, default=0)
    parser.add_argument("--format", choices=["gpkg", "parquet"], default="gpkg")
    parser.add_argument("--work", type=Path, default=Path("bench_out") / "vectorize")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.work.mkdir(parents=True, exist_ok=True)
    grid = build_mosaic(args.work, args.size, args.block)
    blocks = list(iter_blocks(args.size, args.size, args.block))
    mpix = args.size * args.size / 1e6
    for workers in (1, 2):
        with dask_client(ClusterConfig(n_workers=workers, dashboard=False)) as client:
            start = time.perf_counter()
            writer = LayerWriter(args.work / f"polygons.{args.format}")
            count = stream_polygons(
                client, blocks, grid, args.work, LEGEND, [(writer, None)], VectorConfig(mmu_pixels=args.mmu)
            )
            seconds = time.perf_counter() - start
        print(
            f"{workers} worker(s): {seconds:6.2f} s  {mpix / seconds:6.2f} Mpix/s  "
            f"{count / seconds:8.0f} polygons/s "
            f"({count} polygons, {args.size}x{args.size}, block {args.block}, mmu {args.mmu})"
        )


if __name__ == "__main__":
    main()
