"""Batched forward passes: the model is built once per worker process and reused by every task."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np
import torch

from geoseg.models.checkpoint import Checkpoint, load_checkpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferenceSettings:
    """What a task needs to find (or build) its worker's model: small and hashable."""

    checkpoint: str
    batch_size: int = 8
    device: str = "auto"
    amp: bool = True
    torch_threads: int = 0  # 0: leave torch's default


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device is 'cuda' but no CUDA device is visible to this worker")
    return torch.device(requested)


class Predictor:
    """A model on a device, with the checkpoint's normalisation, turning tiles into probabilities."""

    def __init__(self, ckpt: Checkpoint, settings: InferenceSettings) -> None:
        self.ckpt = ckpt
        self.settings = settings
        self.device = pick_device(settings.device)
        if settings.torch_threads > 0:
            torch.set_num_threads(settings.torch_threads)
        self.model = ckpt.build().to(self.device)
        self.mean = np.asarray(ckpt.mean, dtype=np.float32)[:, None, None]
        self.inv_std = (1.0 / np.asarray(ckpt.std, dtype=np.float32))[:, None, None]
        self.amp_dtype = None
        if self.device.type == "cuda" and settings.amp:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        log.info("model %s (%s) on %s, %d threads", ckpt.arch, ckpt.path, self.device, torch.get_num_threads())

    @property
    def n_classes(self) -> int:
        return self.ckpt.n_classes

    def normalize(self, bands: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Standardise bands in place with the training statistics; invalid pixels become 0 (the mean)."""
        bands -= self.mean
        bands *= self.inv_std
        bands[:, ~valid] = 0.0
        return bands

    @torch.inference_mode()
    def probabilities(self, tiles: np.ndarray) -> np.ndarray:
        """Softmax probabilities ``(N, K, T, T)`` for normalised tiles ``(N, C, T, T)``."""
        x = torch.from_numpy(tiles)
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            logits = self.model(x)
        return torch.softmax(logits.float(), dim=1).cpu().numpy()


_cache: dict[InferenceSettings, Predictor] = {}
_lock = threading.Lock()


def get_predictor(settings: InferenceSettings) -> Predictor:
    """This process's predictor for ``settings``: loaded on first use, then shared by all tasks."""
    with _lock:
        predictor = _cache.get(settings)
        if predictor is None:
            predictor = Predictor(load_checkpoint(settings.checkpoint), settings)
            _cache[settings] = predictor
        return predictor
