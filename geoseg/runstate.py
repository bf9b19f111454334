"""A run's state in its output folder: who holds it, what its pixels depend on, which blocks are
committed, and whether it finished.

    OUT/.geoseg/lease.json         the live run that holds OUT, with a heartbeat
    OUT/.geoseg/fingerprint        what determines the pixels (another one is refused without --overwrite)
    OUT/.geoseg/blocks/<key>.json  a block's commit marker, written after its region
    OUT/.geoseg/partials/<fp>/     step-1 results for the neighbours, by fingerprint (:mod:`geoseg.partials`)
    OUT/manifest.json              ``status``: "running" from the start, "finished" or "incomplete" at the end

OUT is a local folder or a URL prefix (:mod:`geoseg.storage`). Every file here is written whole
(under a temporary name moved into place, or as one object), so a reader sees an old or a new
version, never half of one. The lease needs no file lock (object stores have none): it is
created only if absent (a link, or a conditional PUT), refreshed by a heartbeat (on a store a
conditional PUT of the lease; on a disk a file of the holder's own, OUT/.geoseg/heartbeats/, so
that a holder waking from a stall never overwrites a taker's lease), and a holder that stops
beating (or whose process is gone, on the same host) may be replaced.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil

from geoseg import mosaic, storage
from geoseg.logs import one_line
from geoseg.stac_item import ITEM_NAME, remove_asset_files

log = logging.getLogger(__name__)

STATE_DIR = ".geoseg"
MANIFEST_NAME = "manifest.json"
LEASE_NAME = "lease.json"
# A holder whose heartbeat is older than this is presumed dead (on another host; on the same
# host a holder whose process is gone is dead at once). Heartbeats come far more often.
LEASE_TTL_S = 60.0
HEARTBEAT_S = 5.0
# On a disk each holder beats in a file of its own: the lease itself is written only by the run
# that creates or takes it, so a stalled holder that wakes up cannot overwrite a taker's lease.
HEARTBEATS = "heartbeats"
BEATS_IN_FILE = 1e11  # the lease's heartbeat of such a holder (the year 5138)

RUNNING, FINISHED, INCOMPLETE = "running", "finished", "incomplete"

# Bumped whenever geoseg computes votes differently (the last bits count: blocks are summed
# with their neighbours' frames). 2: batch norms folded into the convs.
NUMERICS = 2


class RunError(RuntimeError):
    """The run cannot start or go on (no usable scene, OUT held by another run, ...); one line for the user."""


def error_text(exc: BaseException) -> str:
    """A task's error as its record keeps it: its type and message's first line (a store's error
    adds a page of debug output), without a secret."""
    # redacted whole, then cut: a secret cut in two would no longer be recognised
    return one_line(storage.redact(f"{type(exc).__name__}: {exc}"), 500)


def state(out: str, *parts: str) -> str:
    """A location under OUT's state folder."""
    return storage.join(out, STATE_DIR, *parts)


def fingerprint(relevant: dict[str, Any]) -> str:
    """A short digest of what determines a run's pixels: a changed one must not mix with old blocks."""
    return hashlib.sha256(json.dumps({"numerics": NUMERICS, **relevant}, sort_keys=True).encode()).hexdigest()[:16]


def new_run_id() -> str:
    """This run's identity: in its lease, its manifest and its Dask task keys (runs sharing a
    scheduler never share tasks)."""
    return uuid.uuid4().hex[:12]


def ensure_output_folder(out: str) -> bool:
    """Create ``out`` if needed and check that it can be written; returns whether it was created.
    A file, or on a store an object, of that name is refused: it is no folder."""
    try:
        if storage.is_file(out):  # on a store the outputs would go under the object's name, beside it
            raise RunError(f"{out}: the output exists and is not a folder")
        created = not storage.is_dir(out)
        storage.probe_writable(state(out))
    except storage.StorageError as exc:
        raise RunError(f"cannot write the output folder: {exc}") from None
    except OSError as exc:
        raise RunError(f"{out}: cannot write the output folder ({exc.strerror or exc})") from None
    return created


def local_node() -> str:
    """This machine and process space: the host name and the PID namespace (containers on one
    host may share its name, never a PID namespace)."""
    return f"{socket.gethostname()}:{storage.pid_namespace()}"


@dataclass(frozen=True)
class LeaseHolder:
    """What a lease says about the run holding it."""

    run_id: str
    host: str
    node: str  # see local_node
    pid: int
    pid_started: float
    started: str
    heartbeat: float

    @property
    def beats_in_file(self) -> bool:
        """Whether the holder beats in a file of its own (on a disk: :func:`heartbeat_loc`), which
        its lease says with a heartbeat far in the future: a geoseg that knows only the lease's
        own heartbeat then takes the holder for alive, and a holder of that kind that reads this
        lease sees another run's and stops."""
        return self.heartbeat >= BEATS_IN_FILE

    def alive(self, ttl: float = LEASE_TTL_S) -> bool:
        """Same process space: whether the process is still there (its start time tells a reused
        pid apart). Elsewhere: whether it beat within ``ttl`` (clocks of hosts are assumed to
        agree to well within ``ttl``)."""
        if self.node == local_node():
            try:
                return abs(psutil.Process(self.pid).create_time() - self.pid_started) < 1.0
            except psutil.Error:
                return False
        return time.time() - self.heartbeat < ttl

    def describe(self) -> str:
        age = time.time() - self.heartbeat
        return f"pid {self.pid} on {self.host}, started {self.started}, heartbeat {age:.0f} s ago"


class Lease:
    """This run's hold on OUT: acquired before anything is written there, kept alive by a
    heartbeat thread, and released at the end. A second run finds it and is refused.

    A holder judged gone is moved aside by a rename (of two takers only one can move it), and
    the new lease linked in its place; on an object store it is overwritten only if it is still
    the version judged gone (If-Match). Should another run take the lease over anyway, the
    heartbeat notices, :meth:`check` raises and the workers' block commits stop
    (:func:`require_lease`), so this run writes nothing more.
    """

    def __init__(self, out: str | Path, run_id: str, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.out, self.run_id, self.heartbeat_s = str(out), run_id, heartbeat_s
        self.path = state(self.out, LEASE_NAME)
        proc = psutil.Process()
        self._me = LeaseHolder(
            run_id,
            socket.gethostname(),
            local_node(),
            proc.pid,
            proc.create_time(),
            datetime.now(timezone.utc).isoformat(timespec="seconds"),
            # on a store, a conditional PUT of the lease itself is safe, and tells a taker the
            # holder beat (its version changed); a disk has no such PUT
            time.time() if storage.is_url(self.path) else BEATS_IN_FILE,
        )
        self.taken_over = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost_reason = ""

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        storage.make_dirs(state(self.out))
        replaced: LeaseHolder | None = None
        for _ in range(5):
            if self._create():
                break
            holder = replaced = self._read_settled()
            if holder is None and storage.exists(self.path):  # a passing error must not evict a live run
                raise RunError(
                    f"{self.path}: the lease of the output folder cannot be read; "
                    "if no run is writing there, delete it and start again"
                )
            if holder is not None and holder.alive():
                raise RunError(
                    f"{self.out} is in use by another geoseg run ({holder.describe()}); "
                    "wait for it to finish, or give another output folder"
                )
            if storage.is_url(self.path):
                if self._replace_stale(holder):
                    break
                continue
            if self._move_aside(holder):
                what = holder.describe() if holder else "unreadable lease"
                log.warning("%s: taking over from a run that is gone (%s)", self.out, what)
        else:
            raise RunError(f"{self.out}: could not take the output folder's lease; another run is starting there")
        self._thread = threading.Thread(target=self._beat, name="geoseg-lease", daemon=True)
        self._thread.start()
        try:  # what the run replaced, and writers killed in OUT, left there
            if replaced is not None and replaced.beats_in_file and replaced.run_id != self.run_id:
                storage.delete(heartbeat_loc(self.out, replaced.run_id))
            for folder in (self.out, state(self.out)):
                storage.remove_temporaries(folder)
        except BaseException:
            self.release()
            raise

    def check(self) -> None:
        """Raise if this run lost OUT (taken over, or the heartbeat could not be written)."""
        if self.lost_reason:
            raise RunError(f"{self.out}: {self.lost_reason}")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(OSError):  # best effort: a lease left behind expires
            if self.taken_over:
                pass  # another run holds the lease now: only our own heartbeat goes
            elif storage.is_url(self.path):
                if holds_lease(self.out, self.run_id):
                    storage.delete(self.path)
            else:  # moved aside first: a taker's lease that replaced ours meanwhile is put back
                self._move_aside(self._me)
            if self._me.beats_in_file:
                storage.delete(heartbeat_loc(self.out, self.run_id))

    def _payload(self) -> str:
        beat = self._me.heartbeat if self._me.beats_in_file else time.time()
        return json.dumps(asdict(replace(self._me, heartbeat=beat)))

    def _create(self) -> bool:
        """Create the lease only if there is none (:func:`geoseg.storage.create`: two runs
        cannot both create it)."""
        return storage.create(self.path, self._payload().encode())

    def _read_settled(self) -> LeaseHolder | None:
        """The lease's holder; a lease that cannot be read may be being written: look again."""
        for _ in range(10):
            holder = read_lease(self.out)
            if holder is not None or not storage.exists(self.path):
                return holder
            time.sleep(0.1)
        return None

    def _replace_stale(self, stale: LeaseHolder | None) -> bool:
        """On an object store: overwrite the lease judged gone only if it is still that one (a
        conditional PUT on the version just read): of two takers, one succeeds."""
        try:
            data, version = storage.read_versioned(self.path)
        except storage.StorageError:
            return False  # gone meanwhile: create it again
        current = _holder(data)
        if version is None or current != stale:
            return False  # changed since it was judged (a beat too): judge again
        return storage.replace_if(self.path, self._payload().encode(), version)

    def _move_aside(self, stale: LeaseHolder | None) -> bool:
        """Locally, take the lease judged gone (or, releasing, our own) out of the way by a rename
        (of two takers only one can move it), put back if what moved was not it (a taker that
        came first linked a fresh one meanwhile)."""
        path = Path(self.path)
        aside = path.with_name(f".{LEASE_NAME}.gone-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:  # another taker moved it first
            return False
        moved = read_lease_file(str(aside))
        if stale is not None and moved is not None and moved.run_id != stale.run_id:
            with contextlib.suppress(OSError):
                os.link(aside, path)
        aside.unlink(missing_ok=True)
        return True

    def _beat(self) -> None:
        failing_since: float | None = None
        beat = heartbeat_loc(self.out, self.run_id)
        while not self._stop.wait(self.heartbeat_s):
            try:
                data, version = storage.read_versioned(self.path)
                current = _holder(data)
                if current is not None and current.run_id != self.run_id:
                    taker = read_lease(self.out) or current
                    self.taken_over = True
                    self.lost_reason = f"another run took the output folder over ({taker.describe()})"
                    log.error("%s: %s", self.out, self.lost_reason)
                    return
                if self._me.beats_in_file:
                    storage.write_text(beat, repr(time.time()))  # our own file: never the lease
                elif version is None:  # a store that gives no version
                    storage.write_text(self.path, self._payload())
                else:  # only over our own lease: a taker's write in between wins, seen next beat
                    storage.replace_if(self.path, self._payload().encode(), version)
                failing_since = None
            except OSError as exc:  # a passing storage error; a lasting one loses the lease
                failing_since = failing_since or time.time()
                if time.time() - failing_since > LEASE_TTL_S / 2:
                    self.lost_reason = f"the lease could not be renewed ({exc.strerror or exc})"
                    log.error("%s: %s", self.out, self.lost_reason)
                    return


def _holder(data: bytes) -> LeaseHolder | None:
    try:
        return LeaseHolder(**json.loads(data))
    except (ValueError, TypeError):
        return None


def read_lease_file(loc: str) -> LeaseHolder | None:
    try:
        return _holder(storage.read_bytes(loc))
    except OSError:
        return None


def lease_as_seen(out: str, run_id: str) -> str:
    """What this process finds at OUT's lease: "" where it is run ``run_id``'s, else why not, in a
    few words (run on every worker at the start: one that sees another store, or none, says so)."""
    try:
        holder = _holder(storage.read_bytes(state(out, LEASE_NAME)))
    except storage.StorageError as exc:
        return exc.reason
    if holder is None:
        return "a lease it cannot read"
    if holder.run_id == run_id:
        return ""
    return f"the lease of another run ({(read_lease(out) or holder).describe()})"


def require_lease(out: str, run_id: str | None) -> None:
    """Raise unless run ``run_id`` (if any) holds OUT's lease: a task asks before it writes."""
    if run_id is not None and (seen := lease_as_seen(out, run_id)):
        raise RuntimeError(f"this worker finds {seen} at the output folder; nothing written")


def holds_lease(out: str, run_id: str) -> bool:
    """Whether run ``run_id`` holds OUT's lease."""
    holder = read_lease_file(state(out, LEASE_NAME))
    return holder is not None and holder.run_id == run_id


def read_lease(out: str | Path) -> LeaseHolder | None:
    """The holder of OUT's lease with its last heartbeat, or None if there is none (or it cannot
    be read)."""
    holder = read_lease_file(state(str(out), LEASE_NAME))
    if holder is None or not holder.beats_in_file:
        return holder
    try:
        beat = storage.read_if_exists(heartbeat_loc(str(out), holder.run_id))
        if beat is None:  # not beaten yet: as of when it started
            return replace(holder, heartbeat=datetime.fromisoformat(holder.started).timestamp())
        return replace(holder, heartbeat=float(beat))
    except (OSError, ValueError):  # a heartbeat that cannot be read is no sign of death
        return replace(holder, heartbeat=time.time())


def heartbeat_loc(out: str, run_id: str) -> str:
    """Where the run ``run_id`` beats while it holds OUT's lease (a lease's run id is only a name
    there, whatever the file says)."""
    return state(out, HEARTBEATS, f"{hashlib.sha256(run_id.encode()).hexdigest()[:16]}.json")


def prepare_output(out: str, run_fingerprint: str, overwrite: bool, store: str) -> dict[str, dict[str, Any]]:
    """Check a previous run in ``out`` (held by this run's lease); return the blocks it committed.

    Another fingerprint is refused unless ``overwrite``; then, or when the store is missing,
    the old markers and partial results are removed and the run starts afresh.
    """
    stamp = state(out, "fingerprint")
    if storage.exists(stamp) and not overwrite:
        previous = storage.read_text(stamp).strip()
        if previous != run_fingerprint:
            raise RunError(
                f"{out} holds a run with another model, tiling, block size or inputs "
                f"({previous} != {run_fingerprint}); use --overwrite or another --out"
            )
        if mosaic.exists(storage.join(out, store)):  # v3 or v2
            committed = committed_blocks(out)
            if not committed:  # the run makes the mosaic again: none of its chunks is written
                storage.delete_tree(state(out, "overviews"))
            return committed
    storage.delete_tree(state(out, "blocks"))
    storage.delete_tree(state(out, "partials"))
    storage.delete_tree(state(out, "overviews"))
    # what an export made of the run replaced (its COG, styles, report) would describe the old mosaic
    removed = remove_asset_files(out, keep=(store, MANIFEST_NAME, ITEM_NAME))
    if removed:
        log.info("%s: removed the replaced run's %s", out, ", ".join(removed))
    storage.write_text(stamp, run_fingerprint)
    return {}


def commit_block(out: str, key: str, record: dict[str, Any]) -> None:
    """A block's marker: written (whole) after its region, so a marker means the region is complete."""
    storage.write_text(state(out, "blocks", f"{key}.json"), json.dumps(record))


def committed_blocks(out: str) -> dict[str, dict[str, Any]]:
    """The records of the blocks committed in ``out`` (on a store, fetched concurrently)."""
    markers = [loc for loc in storage.list_files(state(out, "blocks")) if loc.endswith(".json")]
    records = storage.read_many(markers)
    return {storage.name(loc)[: -len(".json")]: json.loads(data) for loc, data in zip(markers, records, strict=True)}


def commit_overview_chunk(out: str, name: str) -> None:
    """An overview chunk's marker (``name``: ``overviews/<f>/<i>_<j>``), written after the chunk:
    a resumed run rewrites only the chunks without one, besides those its own blocks fall in."""
    storage.write_text(state(out, f"{name}.json"), "{}")


def written_overview_chunks(out: str) -> set[str]:
    """The overview chunks with a marker in ``out`` (:func:`commit_overview_chunk`)."""
    markers = [loc for loc in storage.list_files(state(out, "overviews")) if loc.endswith(".json")]
    return {"/".join(loc.rsplit("/", 3)[-3:])[: -len(".json")] for loc in markers}


def forget_overview_chunks(out: str, names: Iterable[str]) -> None:
    """Remove the markers of chunks about to be written again: a run stopped before it rewrites
    one must not leave the earlier run's marker vouching for it."""
    storage.concurrently(storage.delete, [state(out, f"{name}.json") for name in names], storage.is_url(out))


def write_manifest(out: str, manifest: dict[str, Any]) -> str:
    """The manifest, with no secret in it (a signed URL's query, a credential's value)."""
    loc = storage.join(out, MANIFEST_NAME)
    storage.write_text(loc, storage.redact(json.dumps(manifest, indent=2)))
    return loc


def recorded_outputs(out: str) -> dict[str, str | None]:
    """The outputs the manifest in ``out`` names (none where it has none)."""
    data = storage.read_if_exists(storage.join(out, MANIFEST_NAME))
    return json.loads(data).get("outputs", {}) if data is not None else {}


def finished_before(out: str) -> bool:
    """Whether the manifest in ``out`` says its run finished (read before this run marks it running)."""
    data = storage.read_if_exists(storage.join(out, MANIFEST_NAME))
    return data is not None and json.loads(data).get("status") == FINISHED


def mark_running(
    out: str, run_id: str, run_fingerprint: str, n_blocks: int, outputs: dict[str, str | None] | None = None
) -> None:
    """Replace any earlier manifest at once: an old one must never speak for this run. It names
    the ``outputs`` that may lie in OUT meanwhile (the polygon layers, old and new)."""
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_manifest(
        out,
        {
            "status": RUNNING,
            "run_id": run_id,
            "fingerprint": run_fingerprint,
            "started": started,
            "summary": {"blocks": n_blocks},
            "outputs": outputs or {},
        },
    )


def read_finished_manifest(out: str | Path) -> dict[str, Any]:
    """The manifest of a finished run in ``out``; anything else is a :class:`RunError` saying what is missing."""
    out = str(out)
    loc = storage.join(out, MANIFEST_NAME)
    try:
        data = storage.read_if_exists(loc)
    except storage.StorageError as exc:  # the store cannot be reached, access denied: say so
        raise RunError(str(exc)) from None
    if data is None:
        raise RunError(f"{out}: not a geoseg run (no {MANIFEST_NAME})")
    text = data.decode()
    try:
        manifest = json.loads(text)
    except ValueError as exc:
        raise RunError(f"{loc}: unreadable manifest ({exc})") from None
    status = manifest.get("status")
    if status == FINISHED:
        return manifest
    total = manifest.get("summary", {}).get("blocks", "?")
    if status == RUNNING:
        holder = read_lease(out)
        if holder is not None and holder.alive():
            raise RunError(f"{out}: a run is still writing it ({holder.describe()}); wait for it to finish")
        committed = len(storage.list_files(state(out, "blocks")))
        raise RunError(
            f"{out}: the run did not finish ({committed} of {total} blocks committed); "
            "run the same command again to resume it"
        )
    if status == INCOMPLETE:
        failed = {k: v.get("error", "") for k, v in manifest.get("blocks", {}).items() if v.get("status") == "failed"}
        key, error = next(iter(failed.items()), ("?", ""))
        raise RunError(
            f"{out}: the run is incomplete: {len(failed)} of {total} blocks failed "
            f"(first: block {key}: {one_line(error)}); fix the cause and run it again"
        )
    raise RunError(f"{out}: {MANIFEST_NAME} has no status (an older geoseg?); run the same command again to finish it")
