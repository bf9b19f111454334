"""Log records as one line each, without a secret: the job's own, and Dask's, which logs through
handlers of its own on the job's stderr (its scheduler and nannies in this process, a
LocalCluster's workers in theirs). Light to import: workers load it to set up their logs."""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from distributed import WorkerPlugin

from geoseg import storage


def one_line(message: str, limit: int = 300) -> str:
    """The first line of a message, at most ``limit`` characters: its start and its end, where a
    store's error says the status after a long URL (worker errors can be long)."""
    first = message.strip().splitlines()[0] if message.strip() else ""
    if len(first) <= limit:
        return first
    head = (limit - 5) // 2
    return f"{first[:head]} ... {first[len(first) - (limit - 5 - head) :]}"


def one_line_record(record: logging.LogRecord) -> bool:
    """A log filter: the record as one line without a secret, its traceback reduced to the
    exception's type and message. Dask logs through handlers of its own, on the stderr that
    geoseg keeps for one-line errors (a comm closed at shutdown logged 30 lines of traceback)."""
    try:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text = f"{text} ({type(record.exc_info[1]).__name__}: {record.exc_info[1]})"
    except Exception:  # a record that cannot be formatted: logging's own handling says so
        return True
    record.exc_info, record.exc_text, record.stack_info = None, None, None
    record.msg, record.args = one_line(" ".join(storage.redact(text).split()), 1000), None
    return True


def one_line_dask_logs() -> None:
    """:func:`one_line_record` on the handlers Dask's loggers write through, in this process."""
    for handler in logging.getLogger("distributed").handlers:
        if one_line_record not in handler.filters:
            handler.addFilter(one_line_record)


_closed_by_geoseg = False  # in a worker: its cluster is being closed by the job that started it


def cluster_closing() -> None:
    """Run on each worker as its job closes its LocalCluster: what they say from then on is no
    news, and a worker process then ends without the interpreter's teardown (torch's made every
    close of a cluster 1.3 s longer here)."""
    global _closed_by_geoseg
    _closed_by_geoseg = True
    if multiprocessing.parent_process() is not None:  # a worker process, not one inside the job's
        atexit.register(_exit_at_exit)


def _exit_at_exit() -> None:
    atexit.unregister(_exit_at_exit)
    exit_without_teardown(0)


def exit_without_teardown(code: int) -> None:
    """End this process with ``code`` once its work is done, without the interpreter's teardown
    of every module, which took 1-1.7 s here (torch's libraries' destructors). What that teardown
    would do that matters runs first: the atexit handlers, the logs and the standard streams
    flushed. Files are closed by then (with statements)."""
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe
            stream.flush()
    os._exit(code)


def _not_closing(record: logging.LogRecord) -> bool:
    return not _closed_by_geoseg


class OneLineLogs(WorkerPlugin):
    """:func:`one_line_dask_logs` in each worker process of a LocalCluster, whose stderr is the
    command's own (workers of a scheduler of your own keep their logs as they are); and nothing
    once the job closes the cluster (the tasks it cancels, a heartbeat to a scheduler gone): a
    job stopped, or ended, says so itself. A worker that closes for another reason still says why."""

    name = "geoseg-one-line-logs"

    def setup(self, worker: Any) -> None:
        one_line_dask_logs()
        for handler in logging.getLogger("distributed").handlers:
            if _not_closing not in handler.filters:
                handler.addFilter(_not_closing)


@contextmanager
def quiet_dask_logs() -> Iterator[None]:
    """Dask's warnings held back in this process meanwhile: a LocalCluster closed under running
    tasks (a job stopped) warns of the workers it kills, to no one's use."""
    logger = logging.getLogger("distributed")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
