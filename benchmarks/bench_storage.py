"""Object storage against local disk, side by side, on loopback S3 servers: moto's server mode
and s3rver (from the npm registry, installed into .cache/ on first use).

    python benchmarks/bench_storage.py [--size 4096] [--repeat 2] [--workers 2] [--servers moto,s3rver]
                                       [--latency-ms 0]

1. The storage library: obstore against fsspec/s3fs, 200 small objects (markers, records) and
   5 x 8 MB (partial results) put and got, alternating.
2. Reads: every block's tile rows of the same COG (deflate, 512 px tiles) from local disk and
   from the S3 server through GDAL's /vsis3/, with 1 and 2 reader threads (as bench_reads.py).
3. End to end: ``geoseg run`` of the same scene with input and OUT local, and with input and
   OUT on the S3 server (LocalCluster, demo model), alternating; best of ``--repeat``.

Each server shares the two cores with the run, and its CPU time is printed. moto reads an
object whole for every range GET (~65 ms of CPU a request on the 136 MB scene), which no real
store does; s3rver streams the range from a file. Ends with ``ratio[SERVER]=X`` per server and
``ratio=X``, the last server's: the S3 run's time over the local run's (goal: at most 1.10).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Set once, before geoseg is imported; Dask's worker processes import this module again and
# must keep the parent's server.
os.environ.setdefault("GEOSEG_BENCH_S3_PORT", str(free_port()))
PORT = int(os.environ["GEOSEG_BENCH_S3_PORT"])
ENDPOINT = f"http://127.0.0.1:{PORT}"
# s3rver's own key pair (it checks the key; moto takes any)
os.environ.update(
    AWS_ACCESS_KEY_ID="S3RVER", AWS_SECRET_ACCESS_KEY="S3RVER", AWS_REGION="us-east-1", AWS_ENDPOINT_URL=ENDPOINT
)
REPO = Path(__file__).resolve().parent.parent
S3RVER_VERSION = "3.7.1"

import numpy as np  # noqa: E402
import rasterio.shutil  # noqa: E402

from geoseg import storage  # noqa: E402
from geoseg.config import load_config  # noqa: E402
from geoseg.grid import grid_from_scenes  # noqa: E402
from geoseg.inference import InferenceSettings, Predictor  # noqa: E402
from geoseg.jobs import run  # noqa: E402
from geoseg.models.checkpoint import load_checkpoint  # noqa: E402
from geoseg.scenes import open_scene  # noqa: E402
from geoseg.segment import TilingSettings, read_tile_rows  # noqa: E402
from geoseg.synth import SceneSpec, write_scene  # noqa: E402
from geoseg.tiling import iter_blocks  # noqa: E402


def _s3rver_command() -> str:
    prefix = REPO / ".cache" / "s3rver"
    command = prefix / "node_modules" / ".bin" / "s3rver"
    if not command.exists():
        subprocess.run(
            ["npm", "install", "--prefix", str(prefix), "--no-audit", "--no-fund", f"s3rver@{S3RVER_VERSION}"],
            check=True,
        )
    return str(command)


def start_server(kind: str, work: Path) -> subprocess.Popen:
    """The S3 server ``kind`` on PORT, logging to ``work/KIND.log``, with the bucket ``bench``."""
    if kind == "moto":
        command = [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(PORT)]
    else:
        data = work / "s3rver-data"
        data.mkdir()
        command = [_s3rver_command(), "-d", str(data), "-a", "127.0.0.1", "-p", str(PORT)]
        command += ["--no-vhost-buckets", "--configure-bucket", "bench"]
    with open(work / f"{kind}.log", "w") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    for _ in range(300):
        try:
            urllib.request.urlopen(ENDPOINT, timeout=2)
            break
        except urllib.error.HTTPError:  # it answers
            break
        except OSError:
            time.sleep(0.1)
    else:
        raise SystemExit(f"{kind} did not start")
    if kind == "moto":
        import boto3

        boto3.client("s3", endpoint_url=ENDPOINT).create_bucket(Bucket="bench")
    return proc


def delaying_proxy(listen_port: int, target_port: int, latency_s: float) -> None:
    """A TCP proxy on 127.0.0.1:``listen_port`` to ``target_port``, in a thread of its own, that
    passes each chunk the client sends ``latency_s`` after it arrived: a round trip added to
    every request, and no cap on the bandwidth (chunks in flight overlap, as on a network)."""

    async def delayed(reader: asyncio.StreamReader, queue: asyncio.Queue, latency: float) -> None:
        loop = asyncio.get_running_loop()
        try:
            while data := await reader.read(1 << 16):
                await queue.put((loop.time() + latency, data))
        except OSError:
            pass
        await queue.put((0.0, b""))

    async def forward(queue: asyncio.Queue, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        try:
            while (item := await queue.get())[1]:
                due, data = item
                await asyncio.sleep(max(0.0, due - loop.time()))
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", target_port)
        requests: asyncio.Queue = asyncio.Queue()
        answers: asyncio.Queue = asyncio.Queue()
        await asyncio.gather(
            delayed(client_reader, requests, latency_s),
            forward(requests, server_writer),
            delayed(server_reader, answers, 0.0),
            forward(answers, client_writer),
        )

    async def serve() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", listen_port)
        async with server:
            await server.serve_forever()

    threading.Thread(target=asyncio.run, args=(serve(),), daemon=True).start()


def behind_a_delaying_proxy(latency_ms: float) -> None:
    """geoseg's requests (to PORT) go through a proxy that delays them ``latency_ms``, and the
    server listens behind it (this kernel has no netem to delay loopback itself)."""
    global PORT, ENDPOINT
    behind = free_port()
    delaying_proxy(PORT, behind, latency_ms / 1000)
    PORT, ENDPOINT = behind, f"http://127.0.0.1:{behind}"


def backends(bucket: str, repeat: int) -> None:
    import obstore
    import s3fs
    from obstore.store import from_url

    fs = s3fs.S3FileSystem(skip_instance_cache=True)  # not the previous server's connections
    store = from_url(f"s3://{bucket}", client_options={"allow_http": True})
    small, big = b"x" * 300, np.random.default_rng(0).integers(0, 255, 8 << 20, dtype=np.uint8).tobytes()
    ops = {
        "fsspec/s3fs": (lambda k, d: fs.pipe_file(f"{bucket}/{k}", d), lambda k: fs.cat_file(f"{bucket}/{k}")),
        "obstore": (lambda k, d: obstore.put(store, k, d), lambda k: bytes(obstore.get(store, k).bytes())),
    }
    best: dict[str, list[float]] = {name: [np.inf, np.inf] for name in ops}
    for _ in range(repeat):
        for name, (put, get) in ops.items():
            t0 = time.perf_counter()
            for i in range(200):
                put(f"small/{i}.json", small)
            for i in range(200):
                get(f"small/{i}.json")
            t1 = time.perf_counter()
            for i in range(5):
                put(f"big/{i}.npy", big)
            for i in range(5):
                get(f"big/{i}.npy")
            t2 = time.perf_counter()
            best[name] = [min(best[name][0], t1 - t0), min(best[name][1], t2 - t1)]
    for name, (s, b) in best.items():
        print(f"{name:12s} 200 small put+get {s:5.2f} s   5 x 8 MB put+get {b:5.2f} s")
    print(f"small objects: obstore {best['fsspec/s3fs'][0] / best['obstore'][0]:.1f}x faster")


def reads(local: Path, url: str, repeat: int, block: int = 1024) -> None:
    """Each S3 pass reads a copy of its own: GDAL's cache of range requests (per process) would
    otherwise serve the later passes from memory."""
    predictor = Predictor(load_checkpoint("builtin:demo"), InferenceSettings("builtin:demo", device="cpu"))
    tiling = TilingSettings(256, 32, "gaussian", block)
    runs: dict[tuple[str, int], float] = {}
    data = local.read_bytes()
    for k in range(repeat):
        for where, loc in (("local", str(local)), ("s3", url)):
            if where == "s3":
                loc = url.replace(".tif", f"_{k}.tif")
                storage.write_bytes(loc, data)
            scene = open_scene(loc)
            grid = grid_from_scenes([scene])
            for threads in (1, 2):
                if where == "s3":  # a cold copy for each thread count too
                    loc = url.replace(".tif", f"_{k}_{threads}.tif")
                    storage.write_bytes(loc, data)
                    scene = open_scene(loc)
                start = time.perf_counter()
                for b in iter_blocks(grid.height, grid.width, block):
                    rows, cols = tiling.ownership(b, grid)
                    span = tiling.grid.read_span(cols.owned)
                    for _ in read_tile_rows([scene], grid, tiling.grid, rows.owned, span, predictor, {}, threads):
                        pass
                key = (where, threads)
                runs[key] = min(runs.get(key, np.inf), time.perf_counter() - start)
    mpix = grid.width * grid.height / 1e6
    for (where, threads), seconds in runs.items():
        print(f"reads {where:5s} {threads} thread(s): {seconds:6.2f} s  {mpix / seconds:6.1f} Mpix/s")
    settings = {k: v for k, v in os.environ.items() if k in storage.gdal_settings({}) or k.startswith("AWS_S3")}
    print("GDAL settings:", " ".join(f"{k}={v}" for k, v in sorted(settings.items())))


def process_tree_cpu() -> float:
    """CPU seconds of this process and of its ended children (the run's worker processes, once
    the run has closed them; the S3 server is still running and not among them)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def end_to_end(
    local: Path,
    url: str,
    work: Path,
    bucket: str,
    repeat: int,
    workers: int,
    threads: int,
    server: subprocess.Popen,
    kind: str,
) -> float:
    import psutil

    times: dict[str, float] = {}
    cpu = psutil.Process(server.pid)
    for k in range(repeat):
        for where, scene, out in (
            ("local", str(local), str(work / f"{kind}-run{k}")),
            ("s3", url, f"s3://{bucket}/runs/{kind}{k}"),
        ):
            cfg = load_config(
                Path("configs/demo.yaml"),
                [
                    f"inputs=[{scene!r}]",
                    f"out={out!r}",
                    f"cluster.n_workers={workers}",
                    f"cluster.threads_per_worker={threads}",
                    "cluster.dashboard=false",
                ],
            )
            server_cpu = sum(cpu.cpu_times()[:2])
            run_cpu = process_tree_cpu()
            start = time.perf_counter()
            assert run(cfg).ok
            seconds = time.perf_counter() - start
            times[where] = min(times.get(where, np.inf), seconds)
            line = f"run {k} {where:5s} {seconds:6.2f} s  (run: {process_tree_cpu() - run_cpu:5.2f} CPU-s)"
            if where == "s3":  # the server shares the cores: what it took of them, and for how many requests
                log = (work / f"{kind}.log").read_text(errors="replace").splitlines()
                requests = sum(f"/runs/{kind}{k}/" in text for text in log)
                line += f"  (S3 server: {sum(cpu.cpu_times()[:2]) - server_cpu:.2f} CPU-s, {requests} requests)"
            print(line)
    print(f"best: local {times['local']:.2f} s, s3 ({kind}) {times['s3']:.2f} s")
    return times["s3"] / times["local"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="threads per worker")
    parser.add_argument("--servers", default="moto,s3rver")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added to every request to the server")
    args = parser.parse_args()
    if args.latency_ms:
        behind_a_delaying_proxy(args.latency_ms)
    ratios: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench_storage_") as tmp:
        work = Path(tmp)
        scene = write_scene(SceneSpec(args.size, args.size, seed=7), work / "scene.tif")[0]
        cog = work / "scene_cog.tif"
        rasterio.shutil.copy(scene, cog, driver="COG", compress="DEFLATE", blocksize=512)
        for kind in args.servers.split(","):
            print(f"--- S3 server: {kind}")
            server = start_server(kind, work)
            try:
                storage._store.cache_clear()  # the stores' connections were to the previous server
                backends("bench", args.repeat)
                url = f"s3://bench/scenes/{kind}/scene_cog.tif"  # GDAL caches what it read, by name
                storage.write_bytes(url, cog.read_bytes())
                reads(cog, url, args.repeat)
                ratios[kind] = end_to_end(
                    cog, url, work, "bench", args.repeat, args.workers, args.threads, server, kind
                )
            finally:
                server.terminate()
                server.wait()
    for kind, ratio in ratios.items():
        print(f"ratio[{kind}]={ratio:.3f}")
    print(f"ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
