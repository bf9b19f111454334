"""torch.compile against eager forward passes of the same model, side by side in one process.

    python benchmarks/bench_compile.py [--checkpoint builtin:demo] [--batch 8] [--tile 256] [--repeat 3]

Both go through ``Predictor.votes`` (channels_last, softmax, fixed-point votes) on the same
random tiles; eager and compiled runs alternate and the best of each is kept. Prints the
compile time (paid once per worker) and ends with ``speedup=X.XXX`` (eager / compiled).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from geoseg.blending import fixed_window
from geoseg.inference import InferenceSettings, Predictor
from geoseg.models.checkpoint import load_checkpoint


def seconds(predictor: Predictor, tiles: np.ndarray, window: np.ndarray, batches: int) -> float:
    start = time.perf_counter()
    for _ in range(batches):
        predictor.votes(tiles, window)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="builtin:demo")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    ckpt = load_checkpoint(args.checkpoint)
    eager = Predictor(ckpt, InferenceSettings(ckpt.path, args.batch, args.device, True, 0, False))
    compiled = Predictor(ckpt, InferenceSettings(ckpt.path, args.batch, args.device, True, 0, True))
    tiles = np.random.default_rng(0).standard_normal((args.batch, len(ckpt.bands), args.tile, args.tile))
    tiles = tiles.astype(np.float32)
    window = fixed_window("gaussian", args.tile, args.tile // 8)
    start = time.perf_counter()
    compiled.votes(tiles, window)
    print(f"compile (first call): {time.perf_counter() - start:.1f} s")
    eager.votes(tiles, window)
    np.testing.assert_allclose(compiled.votes(tiles, window), eager.votes(tiles, window), rtol=0, atol=2**10)
    t_eager, t_compiled = [], []
    for _ in range(args.repeat):
        t_eager.append(seconds(eager, tiles, window, args.batches))
        t_compiled.append(seconds(compiled, tiles, window, args.batches))
    mpix = args.batches * args.batch * args.tile**2 / 1e6
    print(f"eager     {min(t_eager):7.2f} s  {mpix / min(t_eager):7.3f} Mpix/s  ({ckpt.arch}, {eager.device})")
    print(f"compiled  {min(t_compiled):7.2f} s  {mpix / min(t_compiled):7.3f} Mpix/s")
    print(f"speedup={min(t_eager) / min(t_compiled):.3f}")


if __name__ == "__main__":
    main()
