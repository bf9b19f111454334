"""Zarr codec and chunk size for the class mosaic: write/read time and size on disk, side by side.

    python benchmarks/bench_zarr.py [--mosaic bench_out/out/mosaic.zarr] [--repeat 3]

Takes the classes and confidence of a real mosaic (run ``bench_pipeline.py`` first, or pass
any geoseg mosaic), writes them block by block (one chunk per block, as the workers do) with
each codec and chunk size, then reads them back whole. Times are the best of ``--repeat``;
the ratios are to geoseg's choice (zarr's default zstd level 0, chunk = block, every chunk
stored). The "+ empty check" rows are zarr's default of comparing each chunk with the fill
value first (``write_empty_chunks=False``), which geoseg turns off.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, GzipCodec, ZstdCodec

CODECS = {
    "none": None,
    "zstd-0 (default)": ZstdCodec(level=0),
    "zstd-3": ZstdCodec(level=3),
    "zstd-9": ZstdCodec(level=9),
    "blosc-lz4": BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"),
    "blosc-zstd": BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),
    "gzip-6": GzipCodec(level=6),
    # Zarr v2 (output.zarr_format: 2, for GDAL): numcodecs' names
    "v2 zstd-0 (geoseg)": {"id": "zstd", "level": 0},
    "v2 zlib-1": {"id": "zlib", "level": 1},
    "v2 blosc-lz4": {"id": "blosc", "cname": "lz4", "clevel": 5, "shuffle": 2},
}


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(
    arrays: dict[str, np.ndarray], codec, chunk: int, root: Path, check_empty: bool = False
) -> tuple[float, float, int]:
    """Seconds to write block by block, seconds to read whole, bytes on disk."""
    shutil.rmtree(root, ignore_errors=True)
    v2 = isinstance(codec, dict)
    group = zarr.open_group(str(root), mode="w", zarr_format=2 if v2 else 3)
    h, w = next(iter(arrays.values())).shape
    with zarr.config.set({"array.write_empty_chunks": not check_empty}):
        targets = {
            name: group.create_array(
                name,
                shape=(h, w),
                chunks=(chunk, chunk),
                dtype=a.dtype,
                compressors=codec if v2 else None if codec is None else [codec],
            )
            for name, a in arrays.items()
        }
    start = time.perf_counter()
    for r in range(0, h, chunk):
        for c in range(0, w, chunk):
            for name, a in arrays.items():
                targets[name][r : r + chunk, c : c + chunk] = a[r : r + chunk, c : c + chunk]
    written = time.perf_counter() - start
    start = time.perf_counter()
    for name in arrays:
        zarr.open_array(str(root / name), mode="r")[:]
    read = time.perf_counter() - start
    return written, read, folder_bytes(root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mosaic", type=Path, default=Path("bench_out/out/mosaic.zarr"))
    parser.add_argument("--chunks", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    arrays = {name: zarr.open_array(str(args.mosaic / name), mode="r")[:] for name in ("classes", "confidence")}
    h, w = arrays["classes"].shape
    raw = sum(a.nbytes for a in arrays.values())
    print(f"mosaic {args.mosaic}: {w} x {h}, classes + confidence = {raw / 2**20:.1f} MiB raw")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for chunk in args.chunks:
            variants = [(name, codec, False) for name, codec in CODECS.items()]
            variants.append(("zstd-0 + empty check", CODECS["zstd-0 (default)"], True))
            for name, codec, check_empty in variants:
                runs = [measure(arrays, codec, chunk, Path(tmp) / "m.zarr", check_empty) for _ in range(args.repeat)]
                results[(name, chunk)] = (min(r[0] for r in runs), min(r[1] for r in runs), runs[0][2])
    base = results[("zstd-0 (default)", max(args.chunks))]
    print(f"{'codec':<20} {'chunk':>5} {'write s':>8} {'read s':>7} {'MiB':>7} {'size':>6} {'write':>6} {'read':>6}")
    for (name, chunk), (wr, rd, size) in results.items():
        print(
            f"{name:<20} {chunk:>5} {wr:8.3f} {rd:7.3f} {size / 2**20:7.2f} {size / raw:6.3f} "
            f"{wr / base[0]:6.2f} {rd / base[1]:6.2f}"
        )


if __name__ == "__main__":
    main()
