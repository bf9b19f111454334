"""`geoseg view` tile times: a tile that shows the whole scene, and one at full resolution.

    python benchmarks/bench_view.py [--size 8192] [--block 1024] [--repeat 20]

Writes a class mosaic of ``--size`` px straight from the synthetic label generator (with its
overview levels, as a run writes them), starts the view server in this process on a free
port, and times HTTP requests for 256 px PNG tiles of the classes and the confidence: at the
zoom whose one tile is about as wide as the scene (read from an overview level) and at the
layer's maximum zoom (full resolution), both at the scene's centre. The first request of each
is cold (the level is opened); then ``--repeat`` warm requests, median and slowest printed.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import threading
import time
import urllib.request
from pathlib import Path

from rasterio.crs import CRS

from geoseg import mosaic
from geoseg.blocks import MOSAIC_NAME
from geoseg.grid import OutputGrid
from geoseg.maptiles import WEB_MERCATOR
from geoseg.synth import SceneSpec, make_labels
from geoseg.tiling import iter_blocks
from geoseg.view import ViewServer

LEGEND = {i: n for i, n in enumerate(["water", "forest", "grassland", "cropland", "built-up", "bare soil", "road"])}
COLORS = dict(enumerate(["#1f78b4", "#1b7837", "#a6d96a", "#fee08b", "#d73027", "#bf8a5a", "#4d4d4d"]))


def build_run(out: Path, size: int, block: int) -> None:
    spec = SceneSpec(size, size, seed=3)
    labels = make_labels(spec)
    grid = OutputGrid(CRS.from_user_input(spec.crs).to_wkt(), tuple(spec.transform)[:6], size, size)
    mosaic.create_mosaic(out / MOSAIC_NAME, grid, block, LEGEND, COLORS)
    blocks = list(iter_blocks(size, size, block))
    for b in blocks:
        part = labels[b.rows.start : b.rows.stop, b.cols.start : b.cols.stop]
        mosaic.write_block(out / MOSAIC_NAME, b, part, (part * 9 + 30).astype("uint8"))
    mosaic.write_overviews(out / MOSAIC_NAME, blocks)


def milliseconds(url: str) -> float:
    start = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as response:
        response.read()
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--work", type=Path, default=Path("bench_out") / "view")
    args = parser.parse_args()
    out = args.work / str(args.size)
    if not (out / MOSAIC_NAME).exists():
        out.mkdir(parents=True, exist_ok=True)
        build_run(out, args.size, args.block)
    server = ViewServer(str(out), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    tilejson = json.loads(urllib.request.urlopen(f"{server.url}/classes/tilejson.json").read())
    west, south, east, north = tilejson["bounds"]
    lon, lat = (west + east) / 2, (south + north) / 2
    scene_m = args.size * abs(server.tiles.grid.affine.a)
    whole = int(math.floor(math.log2(40_075_016 * math.cos(math.radians(lat)) / scene_m)))
    print(
        f"mosaic {args.size}x{args.size} px, overview levels {server.tiles.levels}, "
        f"zooms {whole} and {tilejson['maxzoom']}"
    )
    for layer in ("classes", "confidence"):
        for zoom, what in ((whole, "whole scene"), (tilejson["maxzoom"], "full resolution")):
            t = WEB_MERCATOR.tile(lon, lat, zoom)
            url = f"{server.url}/{layer}/tiles/{t.z}/{t.x}/{t.y}.png"
            cold = milliseconds(url)
            warm = [milliseconds(url) for _ in range(args.repeat)]
            level = server.tiles.level_for(t)
            print(
                f"{layer:<10} z{zoom:<2} ({what}, level 1/{level}): cold {cold:6.1f} ms, "
                f"warm median {statistics.median(warm):6.1f} ms, slowest {max(warm):6.1f} ms"
            )
    server.shutdown()


if __name__ == "__main__":
    main()
