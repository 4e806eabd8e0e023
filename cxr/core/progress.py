"""Progress of long work, said once and shown wherever someone is watching.

The work (training epochs, cache chunks, scoring batches) calls `report(key, done, total)`;
what shows it is registered by whoever runs the work: the flows register a listener that
updates a Prefect progress artifact of the run (`tasks.prefect_tasks`), `cxr score` on a
terminal one that draws a tqdm bar. With no listener (tests, the app, a plain function
call) `report` does nothing, and the work never imports Prefect or tqdm for it.

A listener's failure is logged at DEBUG and never stops the work: progress is for people,
not part of the result.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

log = logging.getLogger("cxr.progress")


@dataclass(frozen=True)
class Progress:
    """`done` of `total` `unit` of the work named `key` (e.g. "train-global", "score")."""

    key: str
    done: int
    total: int
    unit: str
    note: str = ""

    @property
    def percent(self) -> float:
        return 100.0 * min(self.done, self.total) / self.total if self.total else 100.0

    def describe(self) -> str:
        return f"{self.key}: {self.done}/{self.total} {self.unit}" + (f" ({self.note})" if self.note else "")


Listener = Callable[[Progress], None]
_listeners: list[Listener] = []
_lock = threading.Lock()


def add_listener(listener: Listener) -> None:
    """Call `listener` with every report from now on (once, however often it is added)."""
    with _lock:
        if listener not in _listeners:
            _listeners.append(listener)


def remove_listener(listener: Listener) -> None:
    with _lock:
        if listener in _listeners:
            _listeners.remove(listener)


@contextmanager
def listening(listener: Listener) -> Iterator[Listener]:
    """`listener` hears the reports made inside the block."""
    add_listener(listener)
    try:
        yield listener
    finally:
        remove_listener(listener)


def report(key: str, done: int, total: int, *, unit: str, note: str = "") -> None:
    """Say that `done` of `total` `unit` of `key` are finished; a no-op without listeners."""
    if not _listeners:
        return
    progress = Progress(key, int(done), int(total), unit, note)
    for listener in list(_listeners):
        try:
            listener(progress)
        except Exception as exc:  # a display must not stop the work it displays
            log.debug("progress listener %r failed: %s", listener, exc)
