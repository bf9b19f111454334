"""The architectures trained on the same synthetic data with the same budget.

    python benchmarks/bench_architectures.py [--steps-per-epoch 16] [--epochs 2]

For each architecture: validation mIoU after the same number of optimiser steps on the same
chips, its parameter count, and CPU inference throughput (forward passes on 256 px tiles,
batch 8, all cores) in Mpix/s. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from geoseg.models import build_model
from geoseg.synth import SceneSpec, write_scene
from geoseg.train import load_train_config, train

ARCHITECTURES = {
    "unet": {"depth": 3, "base_width": 16},
    "fcn": {"base_width": 16},
    "segnet": {"base_width": 16},
    "resunet": {},
    "unetplusplus": {"encoder_name": "resnet18"},
    "fpn": {"encoder_name": "resnet18"},
    "deeplabv3plus": {"encoder_name": "resnet18"},
}


def inference_mpix_s(arch: str, kwargs: dict, tile: int = 256, batch: int = 8, repeats: int = 3) -> float:
    model = build_model(arch, 4, 7, **kwargs).eval()
    x = torch.randn(batch, 4, tile, tile)
    with torch.inference_mode():
        model(x)
        start = time.perf_counter()
        for _ in range(repeats):
            model(x)
    return repeats * batch * tile * tile / 1e6 / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps-per-epoch", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--work", type=Path, default=Path("bench_out") / "architectures")
    parser.add_argument("--only", nargs="*", default=list(ARCHITECTURES))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.work.mkdir(parents=True, exist_ok=True)
    pairs = []
    for seed in (21, 22, 23):
        img, lab = write_scene(SceneSpec(512, 512, seed), args.work / f"t{seed}.tif", args.work / f"t{seed}_l.tif")
        pairs.append({"image": str(img), "labels": str(lab)})
    val_img, val_lab = write_scene(SceneSpec(384, 384, 29), args.work / "val.tif", args.work / "val_l.tif")
    rows = []
    for arch in args.only:
        kwargs = ARCHITECTURES[arch]
        cfg = load_train_config(
            None,
            [],
            base={
                "model": {"arch": arch, "arch_kwargs": kwargs},
                "data": {
                    "train": pairs,
                    "val": [{"image": str(val_img), "labels": str(val_lab)}],
                    "chip_size": 128,
                    "chips_per_epoch": args.steps_per_epoch * args.batch,
                },
                "optim": {"epochs": args.epochs, "batch_size": args.batch, "lr": 3e-3},
                "out": str(args.work / arch),
                "device": "cpu",
            },
        )
        start = time.perf_counter()
        train(cfg)
        seconds = time.perf_counter() - start
        metrics = json.loads((args.work / arch / "metrics.json").read_text())
        rows.append((arch, metrics["final"]["miou"], metrics["parameters"], inference_mpix_s(arch, kwargs), seconds))
        print(f"{arch}: mIoU {rows[-1][1]:.3f}", flush=True)
    print(f"\n{args.epochs} epochs x {args.steps_per_epoch} steps x {args.batch} chips of 128 px, same seed\n")
    print("| architecture | val mIoU | parameters | CPU inference Mpix/s | training s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for arch, miou, params, mpix, seconds in sorted(rows, key=lambda r: -r[1]):
        print(f"| {arch} | {miou:.3f} | {params / 1e6:.2f} M | {mpix:.2f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
