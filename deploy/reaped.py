"""Runs a Flower server process so that the processes it starts leave no zombies.

Flower's SuperExec starts a ClientApp (or ServerApp) process per message and never waits
for it, so each one that exits stays `<defunct>` under its SuperNode until the node stops
(15 after 5 rounds). SIGCHLD set to "ignore" survives exec and is inherited, and Linux then
reaps every exited child at once. The price: a process below this one that waits for a
child of its own gets no exit status (Python's subprocess reports 0). Flower's SuperExec
waits only when it pip-installs an app at run time, which no deployment of ours allows; a
ClientApp that trains in its own process sets the default back first (`app.in_process`),
and our ServerApp starts no processes.

    python -m deploy.reaped flower-supernode ARGS...
"""

from __future__ import annotations

import os
import signal
import sys

# Put before a command, in a compose service or a process backend's argv.
PREFIX = ("python", "-m", "deploy.reaped")


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit("usage: python -m deploy.reaped COMMAND [ARGS...]")
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
