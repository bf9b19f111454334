"""Progress for long loops: a rich bar on a terminal, periodic log lines otherwise (CI, batch logs)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")
log = logging.getLogger("geoseg.progress")


def track(items: Iterable[T], total: int, description: str, log_every_s: float = 10.0) -> Iterator[T]:
    if total == 0:
        return
    if sys.stderr.isatty():
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, transient=False) as bar:
            task = bar.add_task(description, total=total)
            for item in items:
                yield item
                bar.advance(task)
        return
    last = time.monotonic()
    for done, item in enumerate(items, start=1):
        yield item
        now = time.monotonic()
        if done == total or now - last >= log_every_s:
            log.info("%s: %d/%d", description, done, total)
            last = now
