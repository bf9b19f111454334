"""Step 1 results on disk, where the workers that finish the neighbouring blocks find them.

One folder (or URL prefix) per block, under the run's OUT: workers meet only there, never in
each other's local files. The record is written last and commits the block: a rerun (or a
retried task) reuses a committed block instead of computing its tiles again. Local frames are
read memory-mapped: a neighbour reads only the rows it needs.
Only votes are stored: a layer that computed no tile (no valid pixel) has no folder, and a
frame only the pixels that got votes (:func:`geoseg.segment.voted_frames`).

    PARTIALS/<block key>/record.json          the block's step-1 record (tiles, pixel counts)
    PARTIALS/<block key>/<layer>/meta.json    interior and frame rectangles
    PARTIALS/<block key>/<layer>/*.npy        interior classes/confidence, frame votes
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

from geoseg import storage
from geoseg.segment import Frame, Partial
from geoseg.tiling import Rect, Span

RECORD = "record.json"


def _rect_to_list(rect: Rect) -> list[int]:
    return [rect.rows.start, rect.rows.stop, rect.cols.start, rect.cols.stop]


def _rect_from_list(v: list[int]) -> Rect:
    return Rect(Span(v[0], v[1]), Span(v[2], v[3]))


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def save_block(folder: str, layers: dict[str, Partial], record: dict[str, Any]) -> None:
    """Write a block's partial results (one :class:`Partial` per layer) into ``folder``; the
    record is written last and commits them. Another attempt at the same block writes the same
    bytes, so two attempts never leave a mixed result."""
    for name, partial in layers.items():
        if partial.tiles == 0:  # no valid pixel: no votes, and an all-nodata interior (see load_layers)
            continue
        layer = storage.join(folder, name)
        storage.write_bytes(storage.join(layer, "classes.npy"), _npy(partial.classes))
        storage.write_bytes(storage.join(layer, "confidence.npy"), _npy(partial.confidence))
        for k, frame in enumerate(partial.frames):
            storage.write_bytes(storage.join(layer, f"frame{k}.npy"), _npy(frame.sums))
        meta = {
            "interior": _rect_to_list(partial.interior),
            "frames": [_rect_to_list(f.rect) for f in partial.frames],
            "tiles": partial.tiles,
        }
        storage.write_text(storage.join(layer, "meta.json"), json.dumps(meta))
    storage.write_text(storage.join(folder, RECORD), json.dumps(record))


def load_record(folder: str) -> dict[str, Any] | None:
    """The step-1 record of a committed block folder, or None when there is none."""
    loc = storage.join(folder, RECORD)
    return json.loads(storage.read_text(loc)) if storage.exists(loc) else None


def _load(loc: str, mmap: bool) -> np.ndarray:
    """An array; memory-mapped from a local file (a neighbour reads only the rows it needs)."""
    if not storage.is_url(loc):
        return np.load(loc, mmap_mode="r" if mmap else None)
    return np.load(io.BytesIO(storage.read_bytes(loc)))


def load_layers(folder: str, interior: bool = True) -> dict[str, Partial]:
    """A block's partial results by layer; frames memory-mapped where local, the interior only if asked."""
    layers = {}
    for meta_loc in [loc for loc in storage.list_files(folder) if storage.name(loc) == "meta.json"]:
        layer = storage.parent(meta_loc)
        meta = json.loads(storage.read_text(meta_loc))
        frames = [
            Frame(_rect_from_list(r), _load(storage.join(layer, f"frame{k}.npy"), mmap=True))
            for k, r in enumerate(meta["frames"])
        ]
        if interior:
            classes = _load(storage.join(layer, "classes.npy"), mmap=False)
            confidence = _load(storage.join(layer, "confidence.npy"), mmap=False)
        else:
            classes = confidence = np.empty((0, 0), dtype=np.uint8)
        layers[storage.name(layer)] = Partial(
            _rect_from_list(meta["interior"]), classes, confidence, frames, meta["tiles"]
        )
    return layers


def remove_block(folder: str) -> None:
    """Uncommit a block (its record first), then remove the rest: never a record without its layers."""
    storage.delete(storage.join(folder, RECORD))
    storage.delete_tree(folder)
