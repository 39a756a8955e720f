"""What `deploy run` shows while a run streams: a bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from deploy.progress import follow

pytestmark = pytest.mark.unit

LINES = [
    "\x1b[92mINFO \x1b[0m:      Starting logstream\n",
    "\x1b[92mINFO \x1b[0m:      round 1/3: partition 4: loss 6.3 in 1.0 s; "
    "aggregate loss 6.3; 9.0 s, elapsed 9 s, ETA 18 s\n",
    "\x1b[92mINFO \x1b[0m:      round 2/3: partition 7: loss 6.2 in 1.0 s; "
    "aggregate loss 6.2; 8.0 s, elapsed 17 s, ETA 8 s\n",
    "\x1b[92mINFO \x1b[0m:      round 3/3: partition 1: loss 6.1 in 1.0 s; "
    "aggregate loss 6.1; 8.0 s, elapsed 25 s, ETA 0 s\n",
]


def test_a_terminal_gets_the_lines_and_a_bar_that_ends_at_the_last_round():
    out = io.StringIO()
    follow(iter(LINES), Console(file=out, force_terminal=True, width=160))
    shown = out.getvalue()
    assert "rounds" in shown and "3/3" in shown and "ETA" in shown
    assert "round 2/3: partition 7" in shown
    assert "━" in shown  # the bar itself


def test_without_a_terminal_the_lines_pass_through_unchanged():
    out = io.StringIO()
    follow(iter(LINES), Console(file=out, force_terminal=False))
    assert out.getvalue() == "".join(LINES)
