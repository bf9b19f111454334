"""A run's hold on its output folder (the lease) and the status its manifest gives: real files, real processes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from geoseg import runstate
from geoseg.runstate import Lease, LeaseHolder, RunError, read_finished_manifest, read_lease

UNWRITABLE = Path("/sys/geoseg-test-out")  # sysfs: not even root may create a folder there


def write_holder(out, holder: LeaseHolder) -> None:
    (out / ".geoseg").mkdir(parents=True, exist_ok=True)
    (out / ".geoseg" / "lease.json").write_text(json.dumps(asdict(holder)))


def test_a_second_run_on_a_held_folder_is_refused_and_may_start_once_it_is_released(tmp_path):
    with Lease(tmp_path, "first"):
        with pytest.raises(RunError, match="is in use by another geoseg run") as err:
            Lease(tmp_path, "second").acquire()
        assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)
        assert read_lease(tmp_path).run_id == "first"
    assert read_lease(tmp_path) is None
    with Lease(tmp_path, "second"):
        assert read_lease(tmp_path).run_id == "second"


def test_a_lease_left_by_a_process_that_is_gone_is_taken_over_at_once(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    with Lease(tmp_path, "mine") as mine:
        me = read_lease(tmp_path)
    write_holder(tmp_path, replace(me, run_id="killed", pid=int(gone.stdout), heartbeat=time.time()))
    start = time.time()
    with Lease(tmp_path, "mine") as mine:
        assert read_lease(tmp_path).run_id == "mine"
        mine.check()
    assert time.time() - start < 5


def test_a_holder_on_another_host_is_alive_until_its_heartbeat_is_older_than_the_ttl(tmp_path):
    from datetime import datetime, timezone

    with Lease(tmp_path, "probe"):
        me = read_lease(tmp_path)
    # a holder that beats in its lease (on a store, or an older geoseg)
    other = replace(me, run_id="remote", host="another-node", node="another-node:1", pid=1, heartbeat=time.time() - 5)
    write_holder(tmp_path, other)
    with pytest.raises(RunError, match="another-node"):
        Lease(tmp_path, "mine").acquire()
    write_holder(tmp_path, replace(other, heartbeat=time.time() - runstate.LEASE_TTL_S - 1))
    with Lease(tmp_path, "mine"):
        assert read_lease(tmp_path).run_id == "mine"
    # on a disk it beats in a file of its own: a recent beat there keeps it, one that cannot be
    # read is no sign of death (a passing error must not evict a live run), none since it
    # started over the TTL ago is
    long_ago = datetime.fromtimestamp(time.time() - runstate.LEASE_TTL_S - 1, timezone.utc).isoformat()
    in_file = replace(other, heartbeat=runstate.BEATS_IN_FILE, started=long_ago)
    assert in_file.beats_in_file and not other.beats_in_file
    write_holder(tmp_path, in_file)
    beat = Path(runstate.heartbeat_loc(str(tmp_path), "remote"))
    beat.parent.mkdir(parents=True, exist_ok=True)
    beat.write_text(repr(time.time() - 2))
    with pytest.raises(RunError, match=r"another-node.*heartbeat 2 s ago"):
        Lease(tmp_path, "mine").acquire()
    beat.unlink()
    beat.mkdir()  # unreadable as a heartbeat
    with pytest.raises(RunError, match="is in use by another geoseg run"):
        Lease(tmp_path, "mine").acquire()
    beat.rmdir()
    with Lease(tmp_path, "mine"):  # no beat since it started, over the TTL ago: gone
        assert read_lease(tmp_path).run_id == "mine"


def test_a_lease_on_a_disk_reads_as_an_older_geoseg_reads_it():
    """The fields an older geoseg's lease had, and no other (it could not read the lease, and would
    go on beating over a taker's); its heartbeat far in the future: it takes the holder for alive."""
    import tempfile

    with tempfile.TemporaryDirectory() as out, Lease(out, "mine"):
        written = json.loads((Path(out) / ".geoseg" / "lease.json").read_text())
    assert set(written) == {"run_id", "host", "node", "pid", "pid_started", "started", "heartbeat"}
    assert written["heartbeat"] - time.time() > 100 * 365 * 86400


def test_the_heartbeat_refreshes_the_lease_and_a_run_whose_lease_was_taken_stops(tmp_path):
    lease = Lease(tmp_path, "mine", heartbeat_s=0.05)
    lease.acquire()
    first = read_lease(tmp_path).heartbeat
    written = (tmp_path / ".geoseg" / "lease.json").read_bytes()
    time.sleep(0.3)
    assert read_lease(tmp_path).heartbeat > first
    # the holder beats in a file of its own and never writes the lease again: waking from a stall
    # it cannot overwrite the lease of a run that took over meanwhile
    assert (tmp_path / ".geoseg" / "lease.json").read_bytes() == written
    lease.check()
    write_holder(tmp_path, replace(read_lease(tmp_path), run_id="usurper"))
    time.sleep(0.3)
    with pytest.raises(RunError, match="another run took the output folder over"):
        lease.check()
    with pytest.raises(RuntimeError, match=r"this worker finds the lease of another run \(pid .*; nothing written"):
        runstate.require_lease(str(tmp_path), "mine")  # what a block task asks before it writes
    lease.release()
    assert read_lease(tmp_path).run_id == "usurper"  # not ours to remove
    assert not list((tmp_path / ".geoseg" / "heartbeats").iterdir())


def test_only_a_finished_manifest_is_accepted_and_the_error_says_what_is_missing(tmp_path):
    with pytest.raises(RunError, match="not a geoseg run"):
        read_finished_manifest(tmp_path)
    runstate.ensure_output_folder(tmp_path)
    runstate.prepare_output(tmp_path, "f1", overwrite=False, store="mosaic.zarr")
    runstate.mark_running(tmp_path, "r1", "f1", n_blocks=16)
    runstate.commit_block(tmp_path, "0_0", {"status": "done"})
    with pytest.raises(RunError, match=r"did not finish \(1 of 16 blocks committed\)"):
        read_finished_manifest(tmp_path)
    with Lease(tmp_path, "r1"), pytest.raises(RunError, match="a run is still writing it"):
        read_finished_manifest(tmp_path)
    failed = {"status": "incomplete", "summary": {"blocks": 16}, "blocks": {"1_0": {"status": "failed", "error": "x"}}}
    runstate.write_manifest(tmp_path, failed)
    with pytest.raises(RunError, match="incomplete: 1 of 16 blocks failed"):
        read_finished_manifest(tmp_path)
    runstate.write_manifest(tmp_path, {"summary": {"blocks": 16}})
    with pytest.raises(RunError, match="has no status"):
        read_finished_manifest(tmp_path)
    runstate.write_manifest(tmp_path, {"status": "finished", "config": {}})
    assert read_finished_manifest(tmp_path)["status"] == "finished"


def test_a_tasks_error_is_one_line_with_its_end_and_no_piece_of_a_secret(monkeypatch):
    secret = "SUPERSECRETVALUE0123456789"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    url = "http://127.0.0.1:9000/bucket/" + "runs/a-long-prefix/" * 20 + "mosaic.zarr/classes/c/1/1"
    # the secret where a cut at 500 characters would split it, the status at the end
    message = (
        f"{'x' * 460} key {secret} PUT {url} - Server returned non-2xx status code: 403 Forbidden:\n\nDebug source"
    )
    text = runstate.error_text(PermissionError(message))
    assert "\n" not in text and len(text) <= 500
    assert "SUPERSECRET" not in text and text.endswith("403 Forbidden:")


def test_an_output_that_is_a_file_or_cannot_be_written_is_one_line(tmp_path):
    (tmp_path / "taken").write_text("")
    with pytest.raises(RunError, match="exists and is not a folder"):
        runstate.ensure_output_folder(tmp_path / "taken")
    with pytest.raises(RunError, match="cannot write the output folder") as err:
        runstate.ensure_output_folder(UNWRITABLE)
    assert "\n" not in str(err.value)


def test_a_run_refused_on_a_new_folder_leaves_the_holders_files_alone(tmp_path, random_checkpoint, scene_1000x700):
    """Two runs start on a new OUT: the one that loses the lease must not remove what the holder wrote."""
    from conftest import run_config

    from geoseg.jobs import run

    out = tmp_path / "new"
    with Lease(out, "holder"):
        (out / "holders-file").write_text("x")
        with pytest.raises(RunError, match="is in use"):
            run(run_config(random_checkpoint, [scene_1000x700[0]], out))
        assert (out / "holders-file").exists() and read_lease(out).run_id == "holder"


def test_a_lease_moved_aside_by_a_late_taker_is_put_back(tmp_path):
    """A taker that judged an old holder gone, but finds a fresh lease in its place when it moves
    it aside, puts that lease back and does not take over."""
    with Lease(tmp_path, "probe"):
        me = read_lease(tmp_path)
    stale = replace(me, run_id="stale", pid=2**22 + 7)
    fresh = Lease(tmp_path, "fresh")
    fresh.acquire()
    late = Lease(tmp_path, "late")
    assert not late._move_aside(stale) or read_lease(tmp_path).run_id == "fresh"
    assert read_lease(tmp_path).run_id == "fresh"
    fresh.release()


def test_what_killed_writers_left_is_removed_and_nothing_a_live_one_writes(tmp_path):
    """A process killed while it built a layer leaves its scratch folder, and one killed while it
    wrote in OUT a temporary file there: the next scratch folder, or the next run that takes OUT,
    removes them; a live process's scratch folder and a fresh temporary stay."""
    import os
    import tempfile

    from geoseg import storage

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    with storage.scratch("probe") as probe:  # how this host and process space name theirs
        mark = probe.name.split(f"{os.getpid()}-probe-")[0]
    dead = Path(tempfile.gettempdir()) / f"{mark}{int(gone.stdout)}-layer-x1"
    live = Path(tempfile.gettempdir()) / f"{mark}{os.getpid()}-layer-x2"
    elsewhere = Path(tempfile.gettempdir()) / f"geoseg-scratch-0123abcd-{int(gone.stdout)}-layer-x3"  # another host
    for folder in (dead, live, elsewhere):
        folder.mkdir()
        (folder / "polygons.gpkg").write_bytes(b"a layer")
    try:
        with storage.scratch("cog") as mine:
            assert mine.is_dir() and mine.name.startswith(f"{mark}{os.getpid()}-cog-")
            assert not dead.exists() and live.exists() and elsewhere.exists()
        assert not mine.exists()
    finally:
        shutil.rmtree(live, ignore_errors=True)
        shutil.rmtree(elsewhere, ignore_errors=True)
    out = tmp_path / "out"
    out.mkdir()
    old = out / ".polygons.tmp-0123abcd.gpkg"
    journal = out / ".polygons.tmp-0123abcd.gpkg-journal"
    aside = out / ".geoseg" / ".lease.json.gone-4567cdef"
    aside.parent.mkdir()
    for leftover in (old, journal, aside):
        leftover.write_bytes(b"half a layer")
        os.utime(leftover, (time.time() - 3600, time.time() - 3600))
    fresh = out / ".manifest.tmp-89abcdef.json"
    fresh.write_bytes(b"{")
    keep = out / ".notes.txt"
    keep.write_text("the user's")
    with Lease(out, "next"):
        assert not old.exists() and not journal.exists() and not aside.exists()
        assert fresh.exists() and keep.exists()
