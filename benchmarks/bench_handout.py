"""geoseg's own hand-out of step 1 against Dask's scheduler placing every block, side by side.

    python benchmarks/bench_handout.py [--size 4096] [--block 512] [--workers 2] [--repeat 3]

geoseg hands step 1 out one block per free worker thread, in work order. The alternative
submits every block at once with the same priorities and leaves placement to Dask (queuing,
work stealing). Same scene, same LocalCluster (kept across runs), runs alternating; the best of
each is kept. Ends with ``ratio=X``: Dask's time over geoseg's (above 1.02: the own hand-out
is worth keeping).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from geoseg.cluster import dask_client
from geoseg.config import load_config
from geoseg.synth import SceneSpec, write_scene
from pipelines import segment_scenes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--block", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench_handout_") as tmp:
        work = Path(tmp)
        scene = write_scene(SceneSpec(args.size, args.size, seed=7), work / "scene.tif")[0]
        overrides = [
            f"inputs=[{str(scene)!r}]",
            f"output.block_size={args.block}",
            f"cluster.n_workers={args.workers}",
            "cluster.dashboard=false",
            "output.polygons=false",
        ]
        cfg = load_config(Path("configs/demo.yaml"), overrides)
        blocks = -((-args.size // args.block) ** 2)
        print(
            f"scene {args.size} px, block {args.block}: {blocks} blocks, {blocks / args.workers:.0f} per worker thread"
        )
        times: dict[str, list[float]] = {"geoseg": [], "dask": []}
        with dask_client(cfg.cluster) as client:
            segment_scenes.run(cfg.model_copy(update={"out": str(work / "warm")}), client)  # load the model
            for k in range(args.repeat):
                for name in times:
                    segment_scenes.OWN_HAND_OUT = name == "geoseg"
                    run_cfg = cfg.model_copy(update={"out": str(work / f"{name}{k}")})
                    start = time.perf_counter()
                    assert segment_scenes.run(run_cfg, client).ok
                    times[name].append(time.perf_counter() - start)
        for name, runs in times.items():
            print(f"{name:7s} hand-out: runs {', '.join(f'{t:.2f}' for t in runs)} s; best {min(runs):.2f} s")
        medians = {name: sorted(runs)[len(runs) // 2] for name, runs in times.items()}
        print(f"medians: dask / geoseg {medians['dask'] / medians['geoseg']:.3f}")
        print(f"ratio={min(times['dask']) / min(times['geoseg']):.3f}")


if __name__ == "__main__":
    main()
