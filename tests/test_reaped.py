"""deploy.reaped's price and its remedy, in real processes: under it a child's exit status
is lost (Linux reaps the child before anyone can wait for it), until a ClientApp that
trains in its own process sets SIGCHLD back to the default."""

import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.unit

EXIT_STATUS_BEFORE_AND_AFTER = """
import subprocess
from app.in_process import _wait_for_own_children
print(subprocess.run(["sh", "-c", "exit 3"]).returncode)
_wait_for_own_children()
print(subprocess.run(["sh", "-c", "exit 3"]).returncode)
"""


def test_training_in_a_reaped_clientapp_gets_its_childrens_exit_status():
    done = subprocess.run(
        [sys.executable, "-m", "deploy.reaped", sys.executable, "-c", EXIT_STATUS_BEFORE_AND_AFTER],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "3"]


def test_without_a_command_it_says_how_to_use_it():
    done = subprocess.run([sys.executable, "-m", "deploy.reaped"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert (done.returncode, done.stderr.strip()) == (1, "usage: python -m deploy.reaped COMMAND [ARGS...]")
