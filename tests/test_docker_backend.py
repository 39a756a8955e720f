"""`deploy up`'s Docker SDK backend stops at a service that dies before it is healthy, with
the line of its log that says why, instead of waiting out its start period while the
restart policy starts it again and again (a trainer whose model cannot load, on the H100)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import docker
from deploy.backends.docker import LABEL, DockerDeployment
from deploy.compose import PROJECT
from deploy.errors import DeployError
from tests.conftest import ROOT

# 600 s: the module's first `deploy up` builds the app image; on a fresh, loaded 2-core machine
# that build alone took more than 300 s (2026-12-08), and the test then passed in 8.7 s.
pytestmark = [pytest.mark.docker, pytest.mark.timeout(600)]

CAUSE = "FileNotFoundError: No such file or directory: /model/model.safetensors"


def test_a_service_that_dies_before_it_is_healthy_stops_up_with_its_cause(docker_engine, tmp_path):
    crash = f"echo loading; echo '{CAUSE}' >&2; echo 'x ERROR trainer gpu0-0 died 3 times; giving up' >&2; exit 1"
    document = {
        "name": "flowertune-failfast-test",
        "services": {
            "trainer": {
                "image": docker_engine,
                "command": ["sh", "-c", crash],
                "restart": "unless-stopped",
                "healthcheck": {
                    "test": ["CMD", "false"],
                    "interval": "5s",
                    "timeout": "3s",
                    "retries": 3,
                    "start_period": "900s",
                },
            },
            "node": {
                "image": docker_engine,
                "command": ["sleep", "600"],
                "depends_on": {"trainer": {"condition": "service_healthy"}},
            },
        },
    }
    deployment = DockerDeployment(document, tmp_path, dict(os.environ))
    try:
        with pytest.raises(DeployError) as stopped:
            deployment.up(timeout=240)  # the start period alone is 900 s
        assert str(stopped.value) == f"trainer did not become healthy: {CAUSE}"
        assert "node" not in {row[0] for row in deployment.status()}  # nothing waiting on it was started
    finally:
        deployment.down()
    assert deployment.containers() == []


def test_an_up_that_fails_part_way_names_the_cause_and_the_way_to_clean_up(docker_engine, tmp_path, reliability):
    """A model folder missing in the containers: `model-fetch` refuses it, and `deploy up` says
    so in one line with what is left and the command that removes it."""
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home")}
    layout = [
        "--gpus",
        "",
        "--insecure",
        "--dir",
        str(tmp_path),
        "--run-config",
        "model.name='/missing' model.quantization=0",
    ]
    deploy = [sys.executable, "-m", "deploy", "--app", str(ROOT)]
    try:
        up = subprocess.run(
            [*deploy, "up", *layout, "--no-submit", "--base-image", docker_engine],
            capture_output=True,
            text=True,
            env=env,
        )
        assert up.returncode == 2, up.stderr
        (line,) = up.stderr.strip().splitlines()
        assert line.startswith(
            "error: model-fetch exited with code 2: error: model.name = '/missing': no such local model folder"
        ), line
        assert line.endswith("`deploy down` with the same options removes them"), line
    finally:
        down = subprocess.run([*deploy, "down", *layout], capture_output=True, text=True, env=env)
    assert down.returncode == 0, down.stderr
    assert docker.from_env().containers.list(all=True, filters={"label": f"{LABEL}={PROJECT}"}) == []
    reliability.record("bad input", "deploy up whose model folder is missing in the containers", f"exit 2: {line}")
