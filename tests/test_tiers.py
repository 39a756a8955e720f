"""The tiers cover the suite: a test without a tier, or with two, stops collection."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib

import pytest

from tests.conftest import ROOT
from tests.tiers import TIERS

pytestmark = pytest.mark.unit


def collect(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


def test_the_registered_markers_are_the_tiers():
    markers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    assert tuple(m.split(":")[0] for m in markers) == TIERS


@pytest.mark.timeout(300)
def test_every_test_of_the_suite_has_exactly_one_tier():
    done = collect("-p", "no:tests.reliability", "tests")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " tests collected" in done.stdout


@pytest.mark.timeout(120)
def test_a_test_without_a_tier_or_with_two_stops_collection(tmp_path):
    (tmp_path / "test_made_up.py").write_text(
        "import pytest\n\n"
        "def test_no_tier():\n    pass\n\n"
        "@pytest.mark.unit\n@pytest.mark.docker\ndef test_two_tiers():\n    pass\n\n"
        "@pytest.mark.unit\ndef test_one_tier():\n    pass\n"
    )
    done = collect("-p", "tests.tiers", str(tmp_path), cwd=tmp_path)
    assert done.returncode == pytest.ExitCode.USAGE_ERROR, done.stdout + done.stderr
    said = done.stdout + done.stderr
    assert "2 tests need exactly one tier mark of unit, deployment, docker, soak" in said
    assert "test_made_up.py::test_no_tier: none" in said
    assert "test_made_up.py::test_two_tiers: docker, unit" in said
    assert "::test_one_tier: " not in said
