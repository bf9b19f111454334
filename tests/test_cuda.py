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


def test_votes_added_on_the_gpu_give_the_host_sums(tmp_path):
    """On a GPU, a block's votes are added on the device by default; adding the same GPU votes
    on the host gives the same block to the bit, and the passes are timed on the device."""
    from geoseg.grid import grid_from_scenes
    from geoseg.scenes import open_scene
    from geoseg.segment import TilingSettings, predict_block, reader_threads
    from geoseg.synth import SceneSpec, write_scene
    from geoseg.tiling import iter_blocks

    scene = open_scene(write_scene(SceneSpec(700, 600, seed=4), tmp_path / "s.tif")[0])
    grid = grid_from_scenes([scene])
    tiling = TilingSettings(256, 32, "gaussian", 512)
    predictor = Predictor(load_checkpoint("builtin:demo"), InferenceSettings("builtin:demo", device="cuda"))
    assert reader_threads(0, predictor) >= 1
    for block in iter_blocks(grid.height, grid.width, 512):
        device = predict_block(block, [scene], grid, tiling, predictor, read_threads=2)
        host = predict_block(block, [scene], grid, tiling, predictor, on_device=False)
        np.testing.assert_array_equal(device.classes, host.classes)
        np.testing.assert_array_equal(device.confidence, host.confidence)
        for got, want in zip(device.frames, host.frames, strict=True):
            np.testing.assert_array_equal(got.sums, want.sums)
        assert 0 < device.forward_s < 60
