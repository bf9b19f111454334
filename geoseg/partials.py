"""Step 1 results on disk, where the workers that finish the neighbouring blocks find them.

One folder (or URL prefix) per block, under the run's OUT and its fingerprint
(:func:`geoseg.blocks.partials_root`): workers meet only there, never in each other's local
files. What commits a block is written last, whole: a rerun (or a retried task) reuses a
committed block instead of computing its tiles again. Local frames are read memory-mapped: a
neighbour reads only the rows it needs.
Only votes are stored: a layer that computed no tile (no valid pixel) has no folder, and a
frame only the pixels that got votes (:func:`geoseg.segment.voted_frames`). On an object store
the arrays are zstd-compressed (level 1: votes shrink ~5x at ~600 MB/s), since every byte there
crosses a network twice.

On a disk:

    PARTIALS/<block key>/<layer>/*.npy        interior classes/confidence, frame votes
    PARTIALS/<block key>/record.json          the block's step-1 record (tiles, pixel counts,
                                              each layer's interior and frame rectangles),
                                              written after them: it commits the block

On a store, one object, which one PUT writes whole (an object store has no rename, and each
request is a round trip in a row on the task thread):

    PARTIALS/<block key>/step1-<digest>.pack  the arrays, zstd each, at the byte ranges the
                                              record gives; then the record (JSON), then its
                                              length (8 bytes, little-endian)

Blocks saved by earlier versions on a store (``arrays-<digest>.zst`` or ``.npy.zst`` files
beside a ``record.json``) still load.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import struct
from typing import Any

import numpy as np
from numcodecs import Zstd

from geoseg import storage
from geoseg.segment import Frame, Partial
from geoseg.tiling import Rect, Span

log = logging.getLogger(__name__)

RECORD = "record.json"
PACK_PREFIX = "step1-"
_LENGTH = struct.Struct("<Q")  # of the record, at a pack's end
_TAIL = 1 << 16  # bytes of a pack's end fetched to find its record (one request where it fits)
_ZSTD = Zstd(level=1)


def _rect_to_list(rect: Rect) -> list[int]:
    return [rect.rows.start, rect.rows.stop, rect.cols.start, rect.cols.stop]


def _rect_from_list(v: list[int]) -> Rect:
    return Rect(Span(v[0], v[1]), Span(v[2], v[3]))


def _array_loc(layer: str, name: str, legacy: bool = False) -> str:
    """Where an array of a layer lies: ``.npy.zst`` on a store, ``.npy`` on a disk and in the
    blocks that versions before the layer index saved (``legacy``)."""
    compressed = storage.is_url(layer) and not legacy
    return storage.join(layer, f"{name}.npy.zst" if compressed else f"{name}.npy")


def _encode(array: np.ndarray, compressed: bool) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return _ZSTD.encode(buffer.getvalue()) if compressed else buffer.getvalue()


def _decode(data: bytes, compressed: bool) -> np.ndarray:
    return np.load(io.BytesIO(_ZSTD.decode(data) if compressed else data))


def layer_index(layers: dict[str, Partial]) -> dict[str, dict[str, Any]]:
    """What a block's step-1 record says of its stored layers: interior and frame rectangles,
    tiles. Readers need no listing or metadata object to find what they need."""
    return {
        name: {
            "interior": _rect_to_list(partial.interior),
            "frames": [_rect_to_list(f.rect) for f in partial.frames],
            "tiles": partial.tiles,
        }
        for name, partial in layers.items()
        if partial.tiles  # no valid pixel: no votes, and an all-nodata interior (see load_layers)
    }


def save_block(folder: str, layers: dict[str, Partial], record: dict[str, Any]) -> tuple[dict[str, Any], bytes | None]:
    """Write a block's partial results (one :class:`Partial` per layer) into ``folder``,
    committed by the record (with :func:`layer_index` under ``layers``). Returns the record as
    written and, on a store, the pack's bytes. Another attempt at the same block writes the same
    arrays, so two attempts never leave a mixed result.

    On a store, every array goes into one object with the record at its end (module docstring),
    each array at the byte range the record gives under its layer's ``pack``: one PUT a block.
    The neighbours of this run take their frames from the bytes returned (Dask hands them on,
    :func:`load_layers`); a rerun, or a retry on another worker, fetches them with one request."""
    arrays: dict[tuple[str, str], np.ndarray] = {}
    for name in record["layers"]:
        partial = layers[name]
        arrays[(name, "classes")], arrays[(name, "confidence")] = partial.classes, partial.confidence
        arrays.update({(name, f"frame{k}"): frame.sums for k, frame in enumerate(partial.frames)})
    if storage.is_url(folder):
        pack, ranges = bytearray(), {name: {} for name in record["layers"]}
        for (name, array_name), array in arrays.items():
            data = _encode(array, compressed=True)
            ranges[name][array_name] = [len(pack), len(pack) + len(data)]
            pack += data
        # named by its arrays: a record handed on by Dask always finds the arrays it was
        # written with, even where two attempts at the block gave different bytes
        obj = f"{PACK_PREFIX}{hashlib.sha256(pack).hexdigest()[:16]}.pack"
        record = {
            **record,
            "layers": {
                name: {**meta, "pack": {"object": obj, "ranges": ranges[name]}}
                for name, meta in record["layers"].items()
            },
        }
        written = json.dumps(record).encode()
        pack += written + _LENGTH.pack(len(written))
        whole = bytes(pack)  # what is written is what the neighbours are handed
        storage.write_bytes(storage.join(folder, obj), whole)
        return record, whole
    storage.write_many(
        {
            (loc := _array_loc(storage.join(folder, name), array_name)): _encode(array, loc.endswith(".zst"))
            for (name, array_name), array in arrays.items()
        }
    )
    storage.write_text(storage.join(folder, RECORD), json.dumps(record))
    return record, None


def load_record(folder: str) -> dict[str, Any] | None:
    """The step-1 record of a committed block folder, or None when there is none, or none that
    can be used (step 1 is then computed again and saved over it: every rerun would fail on it).
    On a store, one listing finds the block's pack, and one request its record at the end."""
    if storage.is_url(folder):
        found = storage.list_sized(folder.rstrip("/") + "/")
        for loc, size in found:
            if storage.name(loc).startswith(PACK_PREFIX):
                record = _parsed(loc, lambda loc=loc, size=size: _pack_record(loc, size))
                if record is not None:
                    return record
        if not any(storage.name(loc) == RECORD for loc, _ in found):  # one saved by an earlier version
            return None
    loc = storage.join(folder, RECORD)
    data = storage.read_if_exists(loc)
    return None if data is None else _parsed(loc, lambda: json.loads(data))


def _pack_record(loc: str, size: int) -> dict[str, Any]:
    """The record at the end of a pack of ``size`` bytes."""
    tail = storage.read_ranges(loc, [[max(0, size - _TAIL), size]])[0]
    if len(tail) < _LENGTH.size:
        raise ValueError("shorter than its record's length")
    length = _LENGTH.unpack(tail[-_LENGTH.size :])[0]
    if length + _LENGTH.size > size:
        raise ValueError(f"a record of {length} bytes in {size}")
    if length + _LENGTH.size > len(tail):  # a record longer than the tail fetched
        tail = storage.read_ranges(loc, [[size - _LENGTH.size - length, size]])[0]
    return json.loads(tail[len(tail) - _LENGTH.size - length : len(tail) - _LENGTH.size])


def _parsed(loc: str, parse: Any) -> dict[str, Any] | None:
    """``parse()``, or None (logged) where what it reads is damaged, or changed under it (two
    attempts at a block write packs of one name whose records' timings differ)."""
    try:
        return parse()
    except (ValueError, storage.StorageError) as exc:
        log.warning("step-1 record %s is damaged (%s): computing the block again", storage.redact(loc), exc)
        return None


def _index_of(folder: str) -> dict[str, dict[str, Any]]:
    """The layer index of a block saved before records held it: from each layer's meta.json."""
    metas = [loc for loc in storage.list_files(folder) if storage.name(loc) == "meta.json"]
    return {storage.name(storage.parent(loc)): json.loads(storage.read_text(loc)) for loc in metas}


def load_layers(
    folder: str,
    index: dict[str, dict[str, Any]] | None = None,
    interior: bool = True,
    within: Rect | None = None,
    pack: bytes | None = None,
) -> dict[str, Partial]:
    """A block's partial results by layer (``index``: its record's ``layers``), the interior only
    if asked, and only the frames that overlap ``within`` (the reader's block: the others add
    nothing there). Local frames are memory-mapped (a neighbour reads only the rows it needs);
    objects are fetched concurrently, and a pack's ranges are cut from ``pack`` where it is
    given (the bytes :func:`save_block` returned: no request)."""
    legacy = index is None  # saved before records held the index: uncompressed everywhere
    index = _index_of(folder) if index is None else index
    wanted: list[tuple[str, str, str]] = []  # layer, array name, location
    for name, meta in index.items():
        layer = storage.join(folder, name)
        names = ["classes", "confidence"] if interior else []
        names += [
            f"frame{k}"
            for k, rect in enumerate(meta["frames"])
            if within is None or _rect_from_list(rect).overlaps(within)
        ]
        wanted += [(name, array_name, _array_loc(layer, array_name, legacy)) for array_name in names]
    packed = [(name, array_name) for name, array_name, _ in wanted if "pack" in index[name]]
    unpacked = [(name, array_name, loc) for name, array_name, loc in wanted if "pack" not in index[name]]
    found: dict[tuple[str, str], np.ndarray] = {}
    if packed:  # ranges of one object, fetched together (nearby ones in one request)
        obj = index[packed[0][0]]["pack"]["object"]
        spans = [index[name]["pack"]["ranges"][array_name] for name, array_name in packed]
        if pack is None:
            data = storage.read_ranges(storage.join(folder, obj), spans)
        else:
            data = [memoryview(pack)[start:stop] for start, stop in spans]  # no copy: zstd reads them
        found.update({key: _decode(part, compressed=True) for key, part in zip(packed, data, strict=True)})
    locs = [loc for _, _, loc in unpacked]
    if storage.is_url(folder):  # whole objects, fetched together
        arrays = [_decode(data, loc.endswith(".zst")) for loc, data in zip(locs, storage.read_many(locs), strict=True)]
    else:
        arrays = [np.load(loc, mmap_mode="r" if "frame" in storage.name(loc) else None) for loc in locs]
    found.update({(name, array_name): array for (name, array_name, _), array in zip(unpacked, arrays, strict=True)})
    empty = np.empty((0, 0), dtype=np.uint8)
    return {
        name: Partial(
            _rect_from_list(meta["interior"]),
            found.get((name, "classes"), empty),
            found.get((name, "confidence"), empty),
            [
                Frame(_rect_from_list(rect), found[(name, f"frame{k}")])
                for k, rect in enumerate(meta["frames"])
                if (name, f"frame{k}") in found
            ],
            meta["tiles"],
        )
        for name, meta in index.items()
    }


def remove_block(folder: str) -> None:
    """Uncommit a block (its record first), then remove the rest: never a record without its
    layers. On a store the pack is its own record, and the block goes in one request (a block
    an earlier version saved there, its record beside its arrays, too)."""
    if not storage.is_url(folder):
        storage.delete(storage.join(folder, RECORD))
    storage.delete_tree(folder)


def discard(folder: str) -> None:
    """:func:`remove_block` once every reader is done: what cannot be removed is only litter (a
    run with another fingerprint never reads it), so a failure is logged, and the run goes on."""
    try:
        remove_block(folder)
    except OSError as exc:
        log.warning("could not remove step-1 results %s: %s", storage.redact(folder), storage.redact(str(exc)))
