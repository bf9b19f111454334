"""Step 1 results on disk, where the workers that finish the neighbouring blocks find them.

One folder per block, written under a temporary name and renamed into place, so a folder
that exists is complete: a rerun (or a retried task) reuses it instead of computing the
block's tiles again. Frames are read memory-mapped: a neighbour reads only the rows it needs.
Only votes are stored: a layer that computed no tile (no valid pixel) has no folder, and a
frame only the pixels that got votes (:func:`geoseg.segment.voted_frames`).

    PARTIALS/<block key>/record.json          the block's step-1 record (tiles, pixel counts)
    PARTIALS/<block key>/<layer>/meta.json    interior and frame rectangles
    PARTIALS/<block key>/<layer>/*.npy        interior classes/confidence, frame votes
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from geoseg.segment import Frame, Partial
from geoseg.tiling import Rect, Span

RECORD = "record.json"


def _rect_to_list(rect: Rect) -> list[int]:
    return [rect.rows.start, rect.rows.stop, rect.cols.start, rect.cols.stop]


def _rect_from_list(v: list[int]) -> Rect:
    return Rect(Span(v[0], v[1]), Span(v[2], v[3]))


def save_block(folder: Path, layers: dict[str, Partial], record: dict[str, Any]) -> None:
    """Write a block's partial results (one :class:`Partial` per layer) atomically into ``folder``."""
    tmp = folder.with_name(f"{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    for name, partial in layers.items():
        if partial.tiles == 0:  # no valid pixel: no votes, and an all-nodata interior (see load_layers)
            continue
        layer = tmp / name
        layer.mkdir()
        np.save(layer / "classes.npy", partial.classes)
        np.save(layer / "confidence.npy", partial.confidence)
        for k, frame in enumerate(partial.frames):
            np.save(layer / f"frame{k}.npy", frame.sums)
        meta = {
            "interior": _rect_to_list(partial.interior),
            "frames": [_rect_to_list(f.rect) for f in partial.frames],
            "tiles": partial.tiles,
        }
        (layer / "meta.json").write_text(json.dumps(meta))
    (tmp / RECORD).write_text(json.dumps(record))
    try:
        tmp.rename(folder)
    except OSError:  # another attempt at the same block finished first: its result is the same
        shutil.rmtree(tmp, ignore_errors=True)


def load_record(folder: Path) -> dict[str, Any] | None:
    """The step-1 record of a complete block folder, or None when there is none."""
    path = folder / RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def load_layers(folder: Path, interior: bool = True) -> dict[str, Partial]:
    """A block's partial results by layer; frames memory-mapped, the interior only if asked."""
    layers = {}
    for meta_path in sorted(folder.glob("*/meta.json")):
        layer = meta_path.parent
        meta = json.loads(meta_path.read_text())
        frames = [
            Frame(_rect_from_list(r), np.load(layer / f"frame{k}.npy", mmap_mode="r"))
            for k, r in enumerate(meta["frames"])
        ]
        if interior:
            classes, confidence = np.load(layer / "classes.npy"), np.load(layer / "confidence.npy")
        else:
            classes = confidence = np.empty((0, 0), dtype=np.uint8)
        layers[layer.name] = Partial(_rect_from_list(meta["interior"]), classes, confidence, frames, meta["tiles"])
    return layers


def remove_block(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
