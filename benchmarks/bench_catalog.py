"""Planning a run over many scenes on object storage: each scene's header and block offsets,
one by one (as geoseg did) against concurrently (``catalog.catalog`` and ``planning``), side by
side on the loopback S3 servers of bench_storage.py.

    python benchmarks/bench_catalog.py [--scenes 64] [--repeat 2] [--servers moto,s3rver] [--latency-ms 0]

Every pass reads copies of its own (GDAL caches what it read, by name). Ends with
``ratio[SERVER]=X`` per server: the one-by-one time over the concurrent one (best of
``--repeat``). On loopback a request waits on the server's CPU only. A store over a network
adds a round trip to every request: ``--latency-ms`` puts a proxy in front of the server that
holds each chunk of a request that long before passing it on (bench_storage.py).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import bench_storage  # noqa: F401  (sets the S3 environment before geoseg is imported)
import psutil
import rasterio.shutil
from bench_storage import behind_a_delaying_proxy, start_server

from geoseg import storage
from geoseg.catalog import catalog
from geoseg.scenes import data_coverage, open_scene
from geoseg.synth import SceneSpec, write_scene


def one_by_one(locs: list[str]) -> None:
    infos = [open_scene(loc, expected_bands=4) for loc in locs]
    [data_coverage(info.path) for info in infos]


def concurrent(locs: list[str]) -> None:
    infos, bad = catalog(locs, 4)
    assert not bad, bad
    storage.concurrently(lambda info: data_coverage(info.path), infos)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenes", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--servers", default="moto,s3rver")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    args = parser.parse_args()
    if args.latency_ms:
        behind_a_delaying_proxy(args.latency_ms)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        scene = write_scene(SceneSpec(512, 512, seed=3), work / "scene.tif")[0]
        cog = work / "scene_cog.tif"
        rasterio.shutil.copy(scene, cog, driver="COG", compress="DEFLATE", blocksize=256)
        data = cog.read_bytes()
        print(
            f"{args.scenes} COGs of 512 x 512 px, 4 bands ({len(data) / 1e6:.1f} MB each), {args.latency_ms} ms added"
        )
        ratios = {}
        for kind in args.servers.split(","):
            server = start_server(kind, work)
            storage._store.cache_clear()  # the stores' connections were to the previous server
            cpu = psutil.Process(server.pid)
            try:
                best = {"one by one": float("inf"), "concurrent": float("inf")}
                for k in range(args.repeat):
                    for name, plan in (("one by one", one_by_one), ("concurrent", concurrent)):
                        locs = [f"s3://bench/{kind}/{name[:3]}{k}/scene{i:04d}.tif" for i in range(args.scenes)]
                        storage.write_many(dict.fromkeys(locs, data))
                        before = sum(cpu.cpu_times()[:2])
                        start = time.perf_counter()
                        plan(locs)
                        seconds = time.perf_counter() - start
                        best[name] = min(best[name], seconds)
                        served = sum(cpu.cpu_times()[:2]) - before
                        print(f"{kind:6s} {name:10s} {seconds:6.2f} s  (S3 server: {served:.2f} CPU-s)")
                ratios[kind] = best["one by one"] / best["concurrent"]
            finally:
                server.terminate()
                server.wait()
        for kind, ratio in ratios.items():
            print(f"ratio[{kind}]={ratio:.2f}")


if __name__ == "__main__":
    main()
