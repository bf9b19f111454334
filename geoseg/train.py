"""Training on image/label GeoTIFF pairs -> a checkpoint in geoseg's format.

Chips are sampled from rasters held in memory (random, grid or class-balanced), augmented
with what suits overhead imagery (flips, 90-degree rotations, per-band gain/offset jitter),
and fed to any architecture of :mod:`geoseg.models`. Each epoch is validated on held-out
rasters: per-class IoU, mIoU, accuracy and the confusion matrix, as JSON and PNG.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from geoseg import storage
from geoseg.config import DEFAULT_LEGEND, ConfigError, LandCoverClass, apply_overrides, load_legend
from geoseg.metrics import IGNORE, confusion_matrix, summarize
from geoseg.models import Checkpoint, build_model, save_checkpoint
from geoseg.progress import track

log = logging.getLogger(__name__)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RasterPair(_Strict):
    image: str
    labels: str


class DataConfig(_Strict):
    train: list[RasterPair]
    val: list[RasterPair] = Field(default_factory=list)
    bands: list[str] = ["blue", "green", "red", "nir"]
    chip_size: int = Field(128, ge=16)
    chips_per_epoch: int = Field(512, ge=1)
    sampler: Literal["random", "grid"] = "random"
    class_balanced: bool = True


class ModelSpec(_Strict):
    arch: str = "unet"
    arch_kwargs: dict[str, Any] = Field(default_factory=lambda: {"depth": 3, "base_width": 16})


class OptimConfig(_Strict):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = 1e-4
    loss: Literal["ce", "dice", "focal", "ce+dice", "focal+dice"] = "ce+dice"
    class_weights: Literal["none", "inverse_sqrt"] | list[float] = "inverse_sqrt"
    focal_gamma: float = 2.0


class AugmentConfig(_Strict):
    flips: bool = True
    rot90: bool = True
    gain_jitter: float = Field(0.15, ge=0)
    offset_jitter: float = Field(0.02, ge=0)


class TrainConfig(_Strict):
    model: ModelSpec = ModelSpec()
    data: DataConfig
    optim: OptimConfig = OptimConfig()
    augment: AugmentConfig = AugmentConfig()
    classes: list[LandCoverClass] = Field(default_factory=lambda: load_legend(DEFAULT_LEGEND))
    out: str = "train_out"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"


def load_train_config(path: Path | None, overrides: list[str] | None = None, base: dict | None = None) -> TrainConfig:
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"config file not found: {path}")
        data.update(yaml.safe_load(Path(path).read_text()) or {})
    data = apply_overrides(data, overrides or [])
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid training configuration ({path or 'defaults'}): {problems}") from None


@dataclass
class Raster:
    """An image/label pair in memory: bands (C, H, W) float32, labels (H, W) uint8 (255 ignored)."""

    image: np.ndarray
    labels: np.ndarray
    path: str


def load_pair(pair: RasterPair, n_bands: int, n_classes: int) -> Raster:
    """Read and check one image/label pair; mismatches name the file."""
    with storage.open_raster(pair.image) as img, storage.open_raster(pair.labels) as lab:
        if img.count != n_bands:
            raise ConfigError(f"{pair.image}: has {img.count} bands, the config names {n_bands}")
        if (img.crs, img.transform, img.shape) != (lab.crs, lab.transform, lab.shape):
            raise ConfigError(
                f"{pair.labels}: not on the grid of {pair.image} "
                f"({lab.crs} {lab.shape} {tuple(lab.transform)[:6]} vs "
                f"{img.crs} {img.shape} {tuple(img.transform)[:6]})"
            )
        bands = img.read(masked=True)
        labels = lab.read(1)
        scales, offsets = np.asarray(img.scales, np.float32), np.asarray(img.offsets, np.float32)
    valid = ~np.ma.getmaskarray(bands).any(axis=0)
    labels = np.where(valid, labels, IGNORE).astype(np.uint8)
    # the files' own scale and offset, as `geoseg run` applies them before normalising
    scaled = bands.filled(0).astype(np.float32) * scales[:, None, None] + offsets[:, None, None]
    bad = np.setdiff1d(np.unique(labels), [*range(n_classes), IGNORE])
    if bad.size:
        raise ConfigError(f"{pair.labels}: label values {bad.tolist()} are not in the {n_classes} classes")
    return Raster(np.where(valid, scaled, 0).astype(np.float32), labels, pair.image)


def band_stats(rasters: list[Raster]) -> tuple[list[float], list[float]]:
    """Per-band mean and std over the valid pixels of the training rasters."""
    n = len(rasters[0].image)
    sums, sq, count = np.zeros(n), np.zeros(n), 0
    for r in rasters:
        valid = r.labels != IGNORE
        px = r.image[:, valid].astype(np.float64)
        sums += px.sum(1)
        sq += (px**2).sum(1)
        count += valid.sum()
    mean = sums / max(count, 1)
    std = np.sqrt(np.maximum(sq / max(count, 1) - mean**2, 1e-12))
    return mean.tolist(), std.tolist()


class ChipSampler:
    """Top-left corners of training chips: random (optionally class-balanced) or a regular grid."""

    def __init__(
        self, rasters: list[Raster], chip: int, n_classes: int, rng: np.random.Generator, class_balanced: bool
    ) -> None:
        self.rasters, self.chip, self.rng = rasters, chip, rng
        self.class_balanced = class_balanced
        # Where each class lives, for class-balanced sampling: (raster index, flat pixel index).
        self.where: dict[int, list[tuple[int, np.ndarray]]] = {}
        if class_balanced:
            for k in range(n_classes):
                spots = [(i, np.flatnonzero(r.labels == k)) for i, r in enumerate(rasters)]
                spots = [(i, s) for i, s in spots if s.size]
                if spots:
                    self.where[k] = spots

    def _clamp(self, r: Raster, row: int, col: int) -> tuple[int, int]:
        h, w = r.labels.shape
        return (
            int(np.clip(row - self.chip // 2, 0, max(h - self.chip, 0))),
            int(np.clip(col - self.chip // 2, 0, max(w - self.chip, 0))),
        )

    def random(self, n: int) -> list[tuple[int, int, int]]:
        out = []
        classes = sorted(self.where)
        while len(out) < n:
            if self.class_balanced and classes:
                spots = self.where[classes[self.rng.integers(len(classes))]]
                i, flat = spots[self.rng.integers(len(spots))]
                pix = flat[self.rng.integers(flat.size)]
                w = self.rasters[i].labels.shape[1]
                out.append((i, *self._clamp(self.rasters[i], pix // w, pix % w)))
            else:
                i = int(self.rng.integers(len(self.rasters)))
                h, w = self.rasters[i].labels.shape
                row, col = (
                    self.rng.integers(0, max(h - self.chip, 0) + 1),
                    self.rng.integers(0, max(w - self.chip, 0) + 1),
                )
                if (self.rasters[i].labels[row : row + self.chip, col : col + self.chip] != IGNORE).any():
                    out.append((i, int(row), int(col)))
        return out

    def grid(self) -> list[tuple[int, int, int]]:
        out = []
        for i, r in enumerate(self.rasters):
            h, w = r.labels.shape
            for row in range(0, max(h - self.chip, 0) + 1, self.chip):
                for col in range(0, max(w - self.chip, 0) + 1, self.chip):
                    if (r.labels[row : row + self.chip, col : col + self.chip] != IGNORE).any():
                        out.append((i, row, col))
        return out


def make_batch(
    rasters: list[Raster],
    spots: list[tuple[int, int, int]],
    chip: int,
    mean: np.ndarray,
    std: np.ndarray,
    aug: AugmentConfig | None,
    rng: np.random.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for i, row, col in spots:
        r = rasters[i]
        x = r.image[:, row : row + chip, col : col + chip]
        y = r.labels[row : row + chip, col : col + chip]
        if x.shape[1:] != (chip, chip):  # rasters smaller than a chip: pad as nodata
            pad = [(0, chip - x.shape[1]), (0, chip - x.shape[2])]
            x = np.pad(x, [(0, 0), *pad])
            y = np.pad(y, pad, constant_values=IGNORE)
        x = x.copy()
        if aug is not None:
            gain = 1 + rng.uniform(-aug.gain_jitter, aug.gain_jitter, size=(len(x), 1, 1))
            offset = rng.uniform(-aug.offset_jitter, aug.offset_jitter, size=(len(x), 1, 1)) * mean
            x = x * gain.astype(np.float32) + offset.astype(np.float32)
            if aug.flips and rng.random() < 0.5:
                x, y = x[:, :, ::-1], y[:, ::-1]
            if aug.flips and rng.random() < 0.5:
                x, y = x[:, ::-1], y[::-1]
            if aug.rot90:
                k = int(rng.integers(4))
                x, y = np.rot90(x, k, axes=(1, 2)), np.rot90(y, k)
        x = (x - mean) / std
        x[:, y == IGNORE] = 0.0
        xs.append(np.ascontiguousarray(x, dtype=np.float32))
        ys.append(np.ascontiguousarray(y))
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys).astype(np.int64))


class SegmentationLoss(nn.Module):
    """Cross-entropy (class-weighted), focal and soft Dice, alone or summed; label 255 ignored."""

    def __init__(self, kind: str, n_classes: int, weights: torch.Tensor | None, gamma: float = 2.0) -> None:
        super().__init__()
        self.kind, self.n_classes, self.gamma = kind, n_classes, gamma
        self.register_buffer("weights", weights if weights is not None else torch.ones(n_classes))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = target != IGNORE
        safe = torch.where(valid, target, torch.zeros_like(target))
        loss = logits.new_zeros(())
        if "ce" in self.kind.split("+") or "focal" in self.kind.split("+"):
            logp = torch.log_softmax(logits, 1).gather(1, safe[:, None])[:, 0]
            w = self.weights[safe]
            focal = (1 - logp.exp()) ** self.gamma if "focal" in self.kind else 1.0
            term = -focal * logp * w
            loss = loss + (term * valid).sum() / (w * valid).sum().clamp_min(1e-6)
        if "dice" in self.kind.split("+"):
            probs = torch.softmax(logits, 1) * valid[:, None]
            onehot = nn.functional.one_hot(safe, self.n_classes).permute(0, 3, 1, 2) * valid[:, None]
            inter = (probs * onehot).sum((0, 2, 3))
            denom = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
            present = onehot.sum((0, 2, 3)) > 0
            dice = (2 * inter + 1) / (denom + 1)
            loss = loss + (1 - dice[present]).mean() if present.any() else loss
        return loss


def class_weights(rasters: list[Raster], n_classes: int, mode: str | list[float]) -> torch.Tensor | None:
    if isinstance(mode, list):
        if len(mode) != n_classes:
            raise ConfigError(f"optim.class_weights has {len(mode)} values for {n_classes} classes")
        return torch.tensor(mode, dtype=torch.float32)
    if mode == "none":
        return None
    counts = sum(np.bincount(r.labels[r.labels != IGNORE], minlength=n_classes) for r in rasters)
    freq = counts / max(counts.sum(), 1)
    w = 1.0 / np.sqrt(np.maximum(freq, 1e-4))
    return torch.tensor(w / w.mean(), dtype=torch.float32)


def evaluate(
    model: nn.Module,
    rasters: list[Raster],
    chip: int,
    mean: np.ndarray,
    std: np.ndarray,
    n_classes: int,
    device: torch.device,
) -> np.ndarray:
    """Confusion matrix over non-overlapping chips of the validation rasters."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    sampler = ChipSampler(rasters, chip, n_classes, np.random.default_rng(0), class_balanced=False)
    spots = sampler.grid()
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(spots), 16):
            x, y = make_batch(rasters, spots[start : start + 16], chip, mean, std, None, np.random.default_rng(0))
            pred = model(x.to(device)).argmax(1).cpu().numpy()
            cm += confusion_matrix(y.numpy(), pred, n_classes)
    return cm


def plot_history(history: list[dict], cm: np.ndarray, names: list[str], loc: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.5), dpi=110)
    epochs = [h["epoch"] for h in history]
    ax1.plot(epochs, [h["loss"] for h in history], label="train loss")
    if history and "miou" in history[0]:
        ax1.plot(epochs, [h["miou"] for h in history], label="val mIoU")
    ax1.set_xlabel("epoch")
    ax1.legend()
    ax1.grid(alpha=0.3)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    ax2.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax2.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax2.set_yticks(range(len(names)), names)
    ax2.set_xlabel("predicted")
    ax2.set_ylabel("true")
    for (i, j), v in np.ndenumerate(norm):
        ax2.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v > 0.5 else "black")
    ax2.set_title("validation confusion (row-normalised)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    storage.write_bytes(loc, buffer.getvalue())


def train(cfg: TrainConfig) -> str:
    """Train, validate each epoch, and write ``OUT/model.safetensors`` with metrics and plots;
    the pairs and OUT may be local paths or URLs (:mod:`geoseg.storage`). Returns the checkpoint."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    try:
        out = storage.writable_output(cfg.out)
        storage.probe_writable(out)  # before the epochs, not after them
    except storage.StorageError as exc:
        raise ConfigError(str(exc)) from None
    n_classes, n_bands = len(cfg.classes), len(cfg.data.bands)
    if [c.id for c in cfg.classes] != list(range(n_classes)):
        raise ConfigError("classes must have ids 0..N-1 in order for training")
    if not cfg.data.train:
        raise ConfigError("data.train is empty: give at least one image/labels pair")
    train_rasters = [load_pair(p, n_bands, n_classes) for p in cfg.data.train]
    val_rasters = [load_pair(p, n_bands, n_classes) for p in cfg.data.val]
    if all((r.labels == IGNORE).all() for r in train_rasters):
        raise ConfigError("the training rasters have no labelled pixel")
    mean_l, std_l = band_stats(train_rasters)
    mean = np.asarray(mean_l, dtype=np.float32)[:, None, None]
    std = np.asarray(std_l, dtype=np.float32)[:, None, None]
    device = torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    model = build_model(cfg.model.arch, n_bands, n_classes, **cfg.model.arch_kwargs).to(device)
    cuda = device.type == "cuda"
    # Mixed precision on GPU: bf16 where supported (no loss scaling needed), else fp16 with a scaler.
    amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else None
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    weights = class_weights(train_rasters, n_classes, cfg.optim.class_weights)
    loss_fn = SegmentationLoss(cfg.optim.loss, n_classes, weights, cfg.optim.focal_gamma).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    steps_per_epoch = max(1, cfg.data.chips_per_epoch // cfg.optim.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.optim.lr, total_steps=cfg.optim.epochs * steps_per_epoch
    )
    sampler = ChipSampler(train_rasters, cfg.data.chip_size, n_classes, rng, cfg.data.class_balanced)
    names = [c.name for c in cfg.classes]
    history: list[dict] = []
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "training %s (%d parameters) on %s, %d epochs x %d steps",
        cfg.model.arch,
        n_params,
        device,
        cfg.optim.epochs,
        steps_per_epoch,
    )
    t0 = time.perf_counter()
    for epoch in range(1, cfg.optim.epochs + 1):
        model.train()
        if cfg.data.sampler == "grid":
            spots = sampler.grid()
            rng.shuffle(spots)
            spots = spots[: steps_per_epoch * cfg.optim.batch_size]
        else:
            spots = sampler.random(steps_per_epoch * cfg.optim.batch_size)
        losses = []
        batches = range(0, len(spots), cfg.optim.batch_size)
        for start in track(batches, total=len(batches), description=f"epoch {epoch}/{cfg.optim.epochs}"):
            x, y = make_batch(
                train_rasters,
                spots[start : start + cfg.optim.batch_size],
                cfg.data.chip_size,
                mean,
                std,
                cfg.augment,
                rng,
            )
            if cuda:  # pinned host memory: the copy overlaps the previous step's compute
                x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(x)
            loss = loss_fn(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if sched.last_epoch + 1 < sched.total_steps:
                sched.step()
            losses.append(loss.item())
        record: dict[str, Any] = {
            "epoch": epoch,
            "loss": float(np.mean(losses)),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        if val_rasters:
            cm = evaluate(model, val_rasters, cfg.data.chip_size, mean, std, n_classes, device)
            summary = summarize(cm, names)
            record.update(miou=summary["miou"], overall_accuracy=summary["overall_accuracy"], iou=summary["iou"])
        history.append(record)
        log.info(
            "epoch %d: loss %.4f%s",
            epoch,
            record["loss"],
            f", val mIoU {record['miou']:.4f}, OA {record['overall_accuracy']:.4f}" if "miou" in record else "",
        )
    ckpt = Checkpoint(
        arch=cfg.model.arch,
        bands=list(cfg.data.bands),
        classes=[c.model_dump() for c in cfg.classes],
        mean=mean_l,
        std=std_l,
        arch_kwargs=dict(cfg.model.arch_kwargs),
        extra={
            "trained_on": [p.image for p in cfg.data.train],
            "epochs": cfg.optim.epochs,
            "loss": cfg.optim.loss,
            "parameters": n_params,
        },
    )
    path = storage.join(out, "model.safetensors")
    with storage.staged(path) as local:  # on a store, uploaded whole once written
        save_checkpoint(ckpt, model.cpu(), local)
    metrics = {
        "history": history,
        "final": summarize(cm, names) if val_rasters else None,
        "parameters": n_params,
        "train_seconds": round(time.perf_counter() - t0, 1),
    }
    storage.write_text(storage.join(out, "metrics.json"), json.dumps(metrics, indent=2))
    plot_history(history, cm, names, storage.join(out, "training.png"))
    log.info("checkpoint %s", path)
    return path
