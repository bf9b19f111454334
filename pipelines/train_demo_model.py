"""Regenerate the demo model shipped in geoseg/data/ (about 10-15 minutes on 2 CPU cores).

    python -m pipelines.train_demo_model [--work DIR] [--set dotted.key=value ...]

Synthetic scenes from several seeds with varied illumination are the training set; a scene
from a seed never used in training is the validation set. The checkpoint and its metrics
are copied into the package, where ``builtin:demo`` finds them.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

from geoseg.synth import SceneSpec, write_scene
from geoseg.train import load_train_config, train

DATA_DIR = Path(__file__).resolve().parent.parent / "geoseg" / "data"
TRAIN_SEEDS = (11, 12, 13, 14, 15, 16)
VAL_SEED = 97
ILLUMINATION = (0.8, 0.9, 1.0, 1.1, 1.2, 0.95)

DEMO_TRAINING = {
    "model": {"arch": "unet", "arch_kwargs": {"depth": 3, "base_width": 16}},
    "data": {"chip_size": 128, "chips_per_epoch": 1024, "class_balanced": True},
    "optim": {"epochs": 12, "batch_size": 16, "lr": 3e-3, "loss": "ce+dice"},
    "seed": 0,
}


def make_data(work: Path, size: int = 768) -> dict:
    pairs = []
    for seed, gain in zip(TRAIN_SEEDS, ILLUMINATION, strict=True):
        img, lab = write_scene(
            SceneSpec(size, size, seed),
            work / f"train_{seed}.tif",
            work / f"train_{seed}_labels.tif",
            illumination=gain,
        )
        pairs.append({"image": str(img), "labels": str(lab)})
    img, lab = write_scene(SceneSpec(640, 512, VAL_SEED), work / "val.tif", work / "val_labels.tif")
    return {"train": pairs, "val": [{"image": str(img), "labels": str(lab)}]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("train_demo"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--no-install", action="store_true", help="leave geoseg/data/ untouched")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.work.mkdir(parents=True, exist_ok=True)
    base = {**DEMO_TRAINING, "data": {**DEMO_TRAINING["data"], **make_data(args.work)}, "out": str(args.work / "run")}
    cfg = load_train_config(None, args.overrides, base=base)
    ckpt = train(cfg)
    if not args.no_install:
        shutil.copyfile(ckpt, DATA_DIR / "demo_model.safetensors")
        metrics = json.loads((Path(cfg.out) / "metrics.json").read_text())
        (DATA_DIR / "demo_model_metrics.json").write_text(json.dumps(metrics["final"], indent=2))
        logging.info("installed %s", DATA_DIR / "demo_model.safetensors")


if __name__ == "__main__":
    main()
