"""Holding one of several exclusive slots (GPU training slots, warm trainers) across processes.

A slot is a lock file (`fcntl.flock`), so the rule holds across containers that share the
folder, and the kernel drops the lock when its holder dies: a crashed client never keeps
a slot. No torch here: the thin ClientApp uses it to pick a free trainer.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


@contextmanager
def hold_first_free(paths: Sequence[Path], what: str, wait_among: int | None = None) -> Iterator[Path]:
    """Takes the first free slot in `paths` order; when all are busy, waits for one.

    The waiting holder picks one of the first `wait_among` slots (all by default) by its
    PID, so that waiters spread over the slots instead of queueing on one.
    """
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
    handles = [p.open("a+") for p in paths]
    try:
        index = next((i for i, h in enumerate(handles) if _try_lock(h)), None)
        if index is None:
            index = os.getpid() % (wait_among or len(handles))
            log.warning("%s: all %d busy; waiting for %s", what, len(paths), paths[index].name)
            fcntl.flock(handles[index], fcntl.LOCK_EX)
            log.warning("%s: got %s", what, paths[index].name)
        yield paths[index]
    finally:
        for h in handles:
            h.close()  # closing releases the lock


def _try_lock(handle) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
