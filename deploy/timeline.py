"""Where a start-up's time goes: seconds from its beginning until each of its parts was done."""

from __future__ import annotations

import time


class Timeline(dict):
    """A dict, so that it prints and serialises as the plain mapping benchmarks keep; parts
    may be marked from other threads (the trainers' readiness is watched in one)."""

    def __init__(self) -> None:
        super().__init__()
        self.origin = time.monotonic()

    def mark(self, part: str) -> None:
        """The first time only: a second run on the same deployment is no part of its start-up."""
        self.setdefault(part, round(time.monotonic() - self.origin, 2))
