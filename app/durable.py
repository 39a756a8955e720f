"""Files that survive a crash or a power loss whole: checkpoints, resume state, keys.

Each is written under a temporary name, fsynced, and renamed over the old one, and the
rename itself is fsynced; an old folder is removed only once its replacement is in place.
A reader finds the old version or the new one, never half of either.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes, mode: int = 0o644) -> None:
    """`mode` applies from the first byte: a secret written 0600 is never readable by others."""
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)
    with os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, path)
    fsync_path(path.parent)


def append_line(path: Path, line: str) -> None:
    """Appends `line` and its newline in one write, fsynced; a write the disk could take only
    part of is taken back, so that the file never ends in half a line that the next append
    would run on from. Only a crash during the write itself can cut it (`app.report.read_metrics`)."""
    data = (line + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        written = os.write(fd, data)
        if written != len(data):
            os.ftruncate(fd, size)
            raise OSError(errno.ENOSPC, f"{path}: wrote {written} of {len(data)} bytes of a line; took them back")
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_folder(partial: Path, final: Path) -> None:
    """Puts a fully written (and fsynced) folder `partial` where `final` is; the old `final`
    goes only after that, and the rename itself is made durable."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    partial.rename(final)
    fsync_path(final.parent)
    shutil.rmtree(old, ignore_errors=True)
