"""The fixed-point accumulation of :mod:`geoseg.blending` on the model's device (a GPU).

On a GPU a tile's forward pass takes a fraction of a millisecond, less than copying its votes
(K planes of int32) back to the host and adding them there. Here the votes stay where they are
made and only the block's result comes back: the interior's classes and confidence, and the
frame's sums for the neighbours. Integer sums are the same wherever they are added, and the
argmax and confidence follow :func:`geoseg.blending.finalize` operation for operation, so a
block comes out bitwise as with the host accumulator.
"""

from __future__ import annotations

import numpy as np
import torch

from geoseg.blending import NODATA, overlap_slices
from geoseg.tiling import Span, relative_slices


class DeviceAccumulator:
    """:class:`geoseg.blending.Accumulator` with its sums in a torch tensor on ``device``."""

    def __init__(self, n_classes: int, rows: Span, cols: Span, device: torch.device) -> None:
        self.rows, self.cols = rows, cols
        self.n_classes = n_classes
        self.device = device
        self.sums = torch.zeros((n_classes + 1, rows.size, cols.size), dtype=torch.int32, device=device)
        self._window_source: np.ndarray | None = None
        self._window = torch.empty(0)

    def add(
        self, votes: torch.Tensor, window: np.ndarray, row0: int, col0: int, valid: np.ndarray | None = None
    ) -> None:
        """Add one tile's ``votes`` (K, T, T), int32 on the device, with top-left pixel ``(row0, col0)``;
        ``window`` is the fixed-point window (host array), counted only where ``valid``."""
        size_r, size_c = votes.shape[1:]
        dest, src = overlap_slices(self.rows, self.cols, Span(row0, row0 + size_r), Span(col0, col0 + size_c))
        if dest is None:
            return
        self.sums[(slice(0, self.n_classes), *dest)] += votes[(slice(None), *src)]
        weight = self._window_tensor(window)[src]
        if valid is not None:
            weight = weight * torch.from_numpy(np.ascontiguousarray(valid[src])).to(self.device)
        self.sums[(self.n_classes, *dest)] += weight

    def region(self, rows: Span, cols: Span) -> np.ndarray:
        """A host copy of the sums over ``rows`` x ``cols`` (inside the accumulator)."""
        return self._over(rows, cols).cpu().numpy()

    def finalize(self, rows: Span | None = None, cols: Span | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Classes (uint8, 255 nodata) and confidence (uint8 percent) over ``rows`` x ``cols`` (default: all)."""
        sums = self.sums if rows is None or cols is None else self._over(rows, cols)
        classes, confidence = finalize_tensor(sums[: self.n_classes], sums[self.n_classes])
        return classes.cpu().numpy(), confidence.cpu().numpy()

    def _over(self, rows: Span, cols: Span) -> torch.Tensor:
        return self.sums[(slice(None), *relative_slices(self.rows, self.cols, rows, cols))]

    def _window_tensor(self, window: np.ndarray) -> torch.Tensor:
        """``window`` on the device, copied once: callers pass the same cached array every time."""
        if window is not self._window_source:
            self._window = torch.tensor(window, device=self.device)  # a copy: the cached array is read-only
            self._window_source = window
        return self._window


def finalize_tensor(votes: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`geoseg.blending.finalize` in torch: the same running maximum (ties: the lower class)
    and the same float32 division, multiplication and round-half-to-even."""
    classes = torch.zeros(weight.shape, dtype=torch.uint8, device=weight.device)
    best = votes[0].clone()
    for k in range(1, votes.shape[0]):
        classes.masked_fill_(votes[k] > best, k)
        torch.maximum(best, votes[k], out=best)
    covered = weight > 0
    share = torch.where(covered, best.float() / weight.float().clamp(min=1), torch.zeros((), device=weight.device))
    share *= 100.0
    confidence = torch.round(share).clamp(0, 100).to(torch.uint8)
    classes[~covered] = NODATA
    return classes, confidence
