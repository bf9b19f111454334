"""The CUDA path: AMP, pinned memory, automatic batch size. Skipped where no GPU is visible."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geoseg.inference import InferenceSettings, Predictor
from geoseg.models import load_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_gpu_with_amp_agrees_with_cpu():
    ckpt = load_checkpoint("builtin:demo")
    tiles = np.random.default_rng(0).standard_normal((4, 4, 256, 256)).astype(np.float32)
    cpu = Predictor(ckpt, InferenceSettings("builtin:demo", device="cpu")).probabilities(tiles)
    gpu = Predictor(ckpt, InferenceSettings("builtin:demo", device="cuda", amp=True)).probabilities(tiles)
    assert gpu.dtype == np.float32 and gpu.shape == cpu.shape
    assert (gpu.argmax(1) == cpu.argmax(1)).mean() > 0.99


def test_automatic_batch_size_fits_free_memory():
    predictor = Predictor(
        load_checkpoint("builtin:demo"), InferenceSettings("builtin:demo", batch_size=0, device="cuda")
    )
    size = predictor.batch_size(256)
    assert 1 <= size <= 256
    predictor.probabilities(np.zeros((size, 4, 256, 256), np.float32))
