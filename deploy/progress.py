"""What `deploy run` and the `submit` service show while a run goes: the ServerApp's log as
it streams and, where a terminal is attached, a progress bar fed by its per-round lines
(`app.report.progress_line`), with elapsed time and an ETA from the rounds measured so far.
Without a terminal (CI, `docker compose logs`), the plain lines only."""

from __future__ import annotations

import re
from collections.abc import Iterable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

ROUND = re.compile(r"round (\d+)/(\d+): ")


def follow(lines: Iterable[str], console: Console | None = None) -> None:
    console = console or Console()
    if not console.is_terminal:
        for line in lines:
            console.file.write(line)
            console.file.flush()
        return
    columns = (
        TextColumn("rounds"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("rounds", total=None)
        for line in lines:
            # Flower colours its log levels: keep the colours, not the raw escape codes.
            progress.console.print(Text.from_ansi(line.rstrip("\n")), soft_wrap=True)
            if match := ROUND.search(line):
                progress.update(task, completed=int(match[1]), total=int(match[2]))
