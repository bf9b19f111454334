"""Batched forward passes: the model is built once per worker process and reused by every task."""

from __future__ import annotations

import ctypes
import logging
import sys
import threading
import time
from functools import lru_cache

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from geoseg.cluster import usable_cores
from geoseg.config import InferenceSettings
from geoseg.models.checkpoint import Checkpoint, load_checkpoint

log = logging.getLogger(__name__)


_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
HEAP_KEEP = 512 * 2**20  # free memory the heap keeps at its top: a block's accumulator and a forward pass's buffers


@lru_cache(maxsize=1)
def tune_allocator() -> bool:
    """Keep torch's large CPU buffers in the heap instead of mmap/munmap on every forward pass.

    Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which also freezes glibc's
    mmap threshold at 128 KiB: every activation buffer is then mapped, faulted in and unmapped
    again, and forward passes ran ~1.5x slower in workers than in a plain process. Above 32 MB
    (the highest mmap threshold glibc takes; a batch of 8 x 256 px tiles at 16 channels is
    32 MB) only turning mmap off keeps a buffer in the heap: the kernel then no longer zeroes
    every buffer of every pass (a tenth of a pass's time went to page faults). The heap keeps
    ``HEAP_KEEP`` free at its top, and one arena at most bounds what it retains (memory must
    not grow with the scene). glibc only; measured in benchmarks/README.md. A thread that had
    its own arena before this ran keeps it: start workers with ``glibc.malloc.arena_max=1``
    (geoseg.cluster.MALLOC_TUNABLES) so that task threads use the main heap.
    """
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, HEAP_KEEP))
        return all(libc.mallopt(option, value) == 1 for option, value in settings)
    except OSError:  # not glibc (musl, ...): nothing to tune
        return False


def auto_threads() -> int:
    """Intra-op threads for a worker we did not start: its usable cores shared by its task threads."""
    cores = usable_cores()
    try:
        from distributed import get_worker

        return max(1, cores // get_worker().state.nthreads)
    except (ImportError, ValueError):  # not in a worker
        return cores


def fuse_batch_norms(model: nn.Module) -> int:
    """Fold every BatchNorm2d that follows a Conv2d in an ``nn.Sequential`` into the conv, in place.

    In eval mode a batch norm is a per-channel affine map of the conv's output, so the conv's
    weights and bias can absorb it: one pass over the activations fewer per conv (the demo UNet's
    forward passes spent 11 % of their time in batch norm). Covers the UNet's double convs and
    smp's ``Conv2dReLU`` blocks; returns how many were folded.
    """
    folded = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            conv, norm = seq[i], seq[i + 1]
            if (
                isinstance(conv, nn.Conv2d)
                and isinstance(norm, nn.BatchNorm2d)
                and not norm.training
                and norm.running_mean is not None
            ):
                seq[i] = fuse_conv_bn_eval(conv, norm)
                seq[i + 1] = nn.Identity()
                folded += 1
    return folded


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device is 'cuda' but no CUDA device is visible to this worker")
    return torch.device(requested)


def amp_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """The dtype of mixed-precision passes (AMP is for CUDA only), or None for float32 passes."""
    if device.type != "cuda" or not amp:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def numerics(settings: InferenceSettings) -> str:
    """How this process computes votes with ``settings`` ("cpu", "cuda", "cuda-bfloat16", with
    "-compiled"): blocks summed bit for bit must all have been computed the same way."""
    device = pick_device(settings.device)
    dtype = amp_dtype(device, settings.amp)
    return (
        device.type
        + (f"-{str(dtype).removeprefix('torch.')}" if dtype else "")
        + ("-compiled" if settings.compile else "")
    )


class Predictor:
    """A model on a device, with the checkpoint's normalisation, turning tiles into probabilities."""

    def __init__(self, ckpt: Checkpoint, settings: InferenceSettings) -> None:
        self.ckpt = ckpt
        self.settings = settings
        self.device = pick_device(settings.device)
        tune_allocator()
        threads = auto_threads() if settings.torch_threads < 0 else settings.torch_threads
        if threads > 0:
            torch.set_num_threads(threads)
        # channels_last: measured 1.6x faster forward passes on CPU (benchmarks/README.md).
        model = ckpt.build()
        fuse_batch_norms(model)
        self.model = model.to(self.device, memory_format=torch.channels_last)
        if settings.compile:
            self.model = torch.compile(self.model)
        self._batch_sizes: dict[int, int] = {}
        self._window_source: np.ndarray | None = None  # the array ``_window`` was made from
        self._window = torch.empty(0)
        self.mean = np.asarray(ckpt.mean, dtype=np.float32)[:, None, None]
        self.inv_std = (1.0 / np.asarray(ckpt.std, dtype=np.float32))[:, None, None]
        self.amp_dtype = amp_dtype(self.device, settings.amp)
        log.info("model %s (%s) on %s, %d threads", ckpt.arch, ckpt.path, self.device, torch.get_num_threads())

    def batch_size(self, tile_size: int) -> int:
        """The configured batch size, or (when 0) one that fills about half the free GPU memory."""
        if self.settings.batch_size > 0:
            return self.settings.batch_size
        if tile_size not in self._batch_sizes:
            self._batch_sizes[tile_size] = self._auto_batch_size(tile_size)
        return self._batch_sizes[tile_size]

    def _auto_batch_size(self, tile_size: int) -> int:
        if self.device.type != "cuda":
            return 8
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        self.probabilities(np.zeros((2, len(self.ckpt.bands), tile_size, tile_size), dtype=np.float32))
        per_tile = max((torch.cuda.max_memory_allocated(self.device) - base) / 2, 1)
        free, _ = torch.cuda.mem_get_info(self.device)
        size = int(np.clip(0.5 * free / per_tile, 1, 256))
        log.info("batch size %d from %.1f GiB free, %.0f MiB per tile", size, free / 2**30, per_tile / 2**20)
        return size

    @property
    def n_classes(self) -> int:
        return self.ckpt.n_classes

    def normalize(self, bands: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Standardise bands in place with the training statistics; invalid pixels become 0 (the mean)."""
        bands -= self.mean
        bands *= self.inv_std
        np.copyto(bands, 0.0, where=~valid)  # 4x faster than boolean indexing
        return bands

    @torch.inference_mode()
    def probabilities(self, tiles: np.ndarray) -> np.ndarray:
        """Softmax probabilities ``(N, K, T, T)`` for normalised tiles ``(N, C, T, T)``."""
        return self._softmax(tiles).contiguous().cpu().numpy()

    @torch.inference_mode()
    def votes(self, tiles: np.ndarray, window: np.ndarray) -> np.ndarray:
        """Fixed-point votes ``(N, K, T, T)`` int32: probabilities times ``window`` (a fixed-point
        blending window, see :func:`geoseg.blending.fixed_window`), truncated.

        Weighting and quantising on the device, with torch's threads, costs a fraction of doing
        it tile by tile in numpy, and halves nothing of the transfer (int32 like float32).
        """
        return self.device_votes(tiles, window).cpu().numpy()

    @torch.inference_mode()
    def device_votes(self, tiles: np.ndarray, window: np.ndarray) -> torch.Tensor:
        """The votes of :meth:`votes`, left on the model's device (see :mod:`geoseg.device_blending`)."""
        probs = self._softmax(tiles)
        weighted = probs.mul_(self._window_tensor(window))
        return weighted.to(torch.int32, memory_format=torch.contiguous_format)

    def _softmax(self, tiles: np.ndarray) -> torch.Tensor:
        n = len(tiles)
        full = self._batch_sizes.get(tiles.shape[-1], self.settings.batch_size)
        if self.settings.compile and 0 < n < full:
            # A compiled model recompiles for every new batch shape (~30 s on CPU): pad the
            # last batch of a block to the usual size instead.
            tiles = np.concatenate([tiles, np.zeros((full - n, *tiles.shape[1:]), tiles.dtype)])
        x = torch.from_numpy(tiles)
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            logits = self.model(x)
        return torch.softmax(logits.float(), dim=1)[:n]

    def _window_tensor(self, window: np.ndarray) -> torch.Tensor:
        """``window`` as a float32 tensor on the device, converted once: callers pass the same
        cached array (:func:`geoseg.blending.fixed_window`) batch after batch."""
        if window is not self._window_source:
            self._window = torch.from_numpy(window.astype(np.float32)).to(self.device)
            self._window_source = window
        return self._window


class PassTimer:
    """Seconds spent in forward passes, each timed by ``with timer: ...``.

    Wall time on CPU; on a GPU, where the passes run asynchronously, the device's own time
    between CUDA events recorded around each one (read at :meth:`seconds`, which waits for them).
    """

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._wall = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._start = 0.0

    def __enter__(self) -> PassTimer:
        if self._cuda:
            self._events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            self._events[-1][0].record()
        else:
            self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._cuda:
            self._events[-1][1].record()
        else:
            self._wall += time.perf_counter() - self._start

    def seconds(self) -> float:
        if not self._cuda:
            return self._wall
        return sum(start.elapsed_time(end) for start, end in self._events) / 1000  # ms -> s


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
