"""A run's state in its output folder: who holds it, what its pixels depend on, which blocks are
committed, and whether it finished.

    OUT/.geoseg/lease.json         the live run that holds OUT, with a heartbeat
    OUT/.geoseg/fingerprint        what determines the pixels (another one is refused without --overwrite)
    OUT/.geoseg/blocks/<key>.json  a block's commit marker, written after its region
    OUT/.geoseg/partials/          step-1 results for the neighbours (:mod:`geoseg.partials`)
    OUT/manifest.json              ``status``: "running" from the start, "finished" or "incomplete" at the end

Every file here is written whole under a temporary name and then moved into place, so a reader
sees an old or a new version, never half of one. The lease needs no file lock (object stores
have none): it is created only if absent, refreshed by a heartbeat, and a holder that stops
beating (or whose process is gone, on the same host) may be replaced.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)

STATE_DIR = ".geoseg"
MANIFEST_NAME = "manifest.json"
LEASE_NAME = "lease.json"
# A holder whose heartbeat is older than this is presumed dead (on another host; on the same
# host a holder whose process is gone is dead at once). Heartbeats come far more often.
LEASE_TTL_S = 60.0
HEARTBEAT_S = 5.0

RUNNING, FINISHED, INCOMPLETE = "running", "finished", "incomplete"

# Bumped whenever geoseg computes votes differently (the last bits count: blocks are summed
# with their neighbours' frames). 2: batch norms folded into the convs.
NUMERICS = 2


class RunError(RuntimeError):
    """The run cannot start or go on (no usable scene, OUT held by another run, ...); one line for the user."""


def write_atomic(path: Path, text: str) -> None:
    """``text`` into ``path`` under a temporary name, then moved into place."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)


def fingerprint(relevant: dict[str, Any]) -> str:
    """A short digest of what determines a run's pixels: a changed one must not mix with old blocks."""
    return hashlib.sha256(json.dumps({"numerics": NUMERICS, **relevant}, sort_keys=True).encode()).hexdigest()[:16]


def new_run_id() -> str:
    """This run's identity: in its lease, its manifest and its Dask task keys (runs sharing a
    scheduler never share tasks)."""
    return uuid.uuid4().hex[:12]


def ensure_output_folder(out: Path) -> bool:
    """Create ``out`` if needed and check that it can be written; returns whether it was created."""
    if out.exists() and not out.is_dir():
        raise RunError(f"{out}: the output exists and is not a folder")
    created = not out.exists()
    try:
        (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
        probe = out / STATE_DIR / f".write-test-{uuid.uuid4().hex[:8]}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise RunError(f"{out}: cannot write the output folder ({exc.strerror or exc})") from None
    return created


@dataclass(frozen=True)
class LeaseHolder:
    """What a lease says about the run holding it."""

    run_id: str
    host: str
    pid: int
    pid_started: float
    started: str
    heartbeat: float

    def alive(self, ttl: float = LEASE_TTL_S) -> bool:
        if self.host == socket.gethostname():
            try:  # the same process (a pid may be reused: its start time tells them apart)
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

    If another run took the lease over anyway (it judged this one dead), :meth:`check` raises,
    so this run stops before it writes anything more.
    """

    def __init__(self, out: Path, run_id: str, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.out, self.run_id, self.heartbeat_s = out, run_id, heartbeat_s
        self.path = out / STATE_DIR / LEASE_NAME
        proc = psutil.Process()
        self._me = LeaseHolder(
            run_id,
            socket.gethostname(),
            proc.pid,
            proc.create_time(),
            datetime.now(timezone.utc).isoformat(timespec="seconds"),
            time.time(),
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost_to: LeaseHolder | None = None

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                break
            holder = read_lease(self.out)
            if holder is not None and holder.alive():
                raise RunError(
                    f"{self.out} is in use by another geoseg run ({holder.describe()}); "
                    "wait for it to finish, or give another output folder"
                )
            if holder is not None:
                log.warning("%s: taking over from a run that is gone (%s)", self.out, holder.describe())
            self._write()
            time.sleep(0.2)  # two takers at once: the last write wins, the other backs off
            if (current := read_lease(self.out)) is not None and current.run_id == self.run_id:
                break
        else:
            raise RunError(f"{self.out}: could not take the output folder's lease; another run is starting there")
        self._thread = threading.Thread(target=self._beat, name="geoseg-lease", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise if another run took OUT over."""
        if self.lost_to is not None:
            raise RunError(f"{self.out}: another run took the output folder over ({self.lost_to.describe()})")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        current = read_lease(self.out)
        if current is not None and current.run_id == self.run_id:
            self.path.unlink(missing_ok=True)

    def _payload(self) -> str:
        return json.dumps(asdict(LeaseHolder(**{**asdict(self._me), "heartbeat": time.time()})))

    def _create(self) -> bool:
        """Create the lease only if there is none: written whole, then linked into place (a link
        fails where the name exists, so two runs cannot both create it)."""
        tmp = self.path.with_name(f".{LEASE_NAME}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_text(self._payload())
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _write(self) -> None:
        write_atomic(self.path, self._payload())

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            current = read_lease(self.out)
            if current is not None and current.run_id != self.run_id:
                self.lost_to = current
                log.error("%s: another run took the output folder over (%s)", self.out, current.describe())
                return
            self._write()


def read_lease(out: Path) -> LeaseHolder | None:
    """The holder of OUT's lease, or None if there is none (or it cannot be read)."""
    try:
        return LeaseHolder(**json.loads((out / STATE_DIR / LEASE_NAME).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def prepare_output(out: Path, run_fingerprint: str, overwrite: bool, store: str) -> dict[str, dict[str, Any]]:
    """Check a previous run in ``out`` (held by this run's lease); return the blocks it committed.

    Another fingerprint is refused unless ``overwrite``; then, or when the store is missing,
    the old markers and partial results are removed and the run starts afresh.
    """
    state = out / STATE_DIR
    stamp = state / "fingerprint"
    blocks_dir = state / "blocks"
    if stamp.exists() and not overwrite:
        previous = stamp.read_text().strip()
        if previous != run_fingerprint:
            raise RunError(
                f"{out} holds a run with another model, tiling, block size or inputs "
                f"({previous} != {run_fingerprint}); use --overwrite or another --out"
            )
        if (out / store).exists():
            return committed_blocks(out)
    for p in blocks_dir.glob("*.json"):
        p.unlink()
    shutil.rmtree(state / "partials", ignore_errors=True)
    blocks_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(stamp, run_fingerprint)
    return {}


def commit_block(out: Path, key: str, record: dict[str, Any]) -> None:
    """A block's marker: written after its region, so a marker means the region is complete."""
    write_atomic(out / STATE_DIR / "blocks" / f"{key}.json", json.dumps(record))


def committed_blocks(out: Path) -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / STATE_DIR / "blocks").glob("*.json"))}


def write_manifest(out: Path, manifest: dict[str, Any]) -> Path:
    path = out / MANIFEST_NAME
    write_atomic(path, json.dumps(manifest, indent=2))
    return path


def mark_running(out: Path, run_id: str, run_fingerprint: str, n_blocks: int) -> None:
    """Replace any earlier manifest at once: an old one must never speak for this run."""
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_manifest(
        out,
        {
            "status": RUNNING,
            "run_id": run_id,
            "fingerprint": run_fingerprint,
            "started": started,
            "summary": {"blocks": n_blocks},
        },
    )


def read_finished_manifest(out: Path) -> dict[str, Any]:
    """The manifest of a finished run in ``out``; anything else is a :class:`RunError` saying what is missing."""
    path = out / MANIFEST_NAME
    if not path.is_file():
        raise RunError(f"{out}: not a geoseg run (no {MANIFEST_NAME})")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise RunError(f"{path}: unreadable manifest ({exc})") from None
    status = manifest.get("status")
    if status == FINISHED:
        return manifest
    total = manifest.get("summary", {}).get("blocks", "?")
    committed = len(list((out / STATE_DIR / "blocks").glob("*.json")))
    if status == RUNNING:
        holder = read_lease(out)
        if holder is not None and holder.alive():
            raise RunError(f"{out}: a run is still writing it ({holder.describe()}); wait for it to finish")
        raise RunError(
            f"{out}: the run did not finish ({committed} of {total} blocks committed); "
            "run the same command again to resume it"
        )
    if status == INCOMPLETE:
        failed = {k: v.get("error", "") for k, v in manifest.get("blocks", {}).items() if v.get("status") == "failed"}
        first = next(iter(failed.items()), ("?", ""))
        raise RunError(
            f"{out}: the run is incomplete: {len(failed)} of {total} blocks failed "
            f"(first: block {first[0]}: {first[1]}); fix the cause and run it again"
        )
    raise RunError(f"{out}: {MANIFEST_NAME} has no status (an older geoseg?); run the same command again to finish it")
