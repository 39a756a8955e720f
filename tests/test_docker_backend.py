"""`deploy up`'s Docker SDK backend stops at a service that dies before it is healthy, with
the line of its log that says why, instead of waiting out its start period while the
restart policy starts it again and again (a trainer whose model cannot load, on the H100)."""

from __future__ import annotations

import os

import pytest

from deploy.backends.docker import DockerDeployment
from deploy.errors import DeployError

pytestmark = [pytest.mark.docker, pytest.mark.timeout(300)]

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
