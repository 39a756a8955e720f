"""The users' first path: plain `docker compose up` on a rendered file runs the job and
leaves the checkpoints in the host's results folder (TLS and node authentication on), with
hardened containers and no Hugging Face token set; and `docker compose config` accepts every
layout we render."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from deploy.compose import RenderOptions, write
from deploy.images import build_images, outdated_images
from deploy.topology import Host, plan
from tests.conftest import ROOT

pytestmark = pytest.mark.docker

PROJECT = "flowertune-compose-test"


def toml_value(value) -> str:
    return json.dumps(value) if not isinstance(value, bool) else str(value).lower()


def compose(folder, *args: str) -> subprocess.CompletedProcess:
    """Without HF_TOKEN_FILE, whatever the caller's shell holds: the path of users without a token."""
    command = ["docker", "compose", "-p", PROJECT, "-f", str(folder / "compose.yaml"), *args]
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN_FILE"}
    return subprocess.run(command, capture_output=True, text=True, env=env)


def assert_hardened(container, service: str) -> None:
    """What deploy/compose.py renders for every service, as the engine really runs it."""
    host, config = container.attrs["HostConfig"], container.attrs["Config"]
    assert host["CapDrop"] == ["ALL"] and host["SecurityOpt"] == ["no-new-privileges:true"], service
    assert host["ReadonlyRootfs"] and set(host["Tmpfs"]) == {"/tmp", "/home/flwr"}, service
    assert config["User"] == ("0:0" if service == "setup" else "1000:1000"), service
    assert not any(e.startswith("HF_TOKEN=") for e in config["Env"]), service


def test_docker_compose_up_runs_the_job(demo, tmp_path, docker_engine):
    import docker

    if outdated_images(docker.from_env(), ROOT):
        build_images(ROOT, docker_engine)
    overrides = {**demo.run_config(), "model.name": "/demo/tiny-gemma2", "dataset.data-files": "/demo/alpaca.json"}
    overrides["num-server-rounds"] = 1
    run_config = " ".join(f"{k}={toml_value(v)}" for k, v in overrides.items())
    render = subprocess.run(
        [
            sys.executable,
            "-m",
            "deploy",
            "--app",
            str(ROOT),
            "render",
            "--gpus",
            "",
            "--out",
            str(tmp_path),
            "--volume",
            f"{demo.model_dir.parent}:/demo:ro",
            "--model",
            "/demo/tiny-gemma2",
            "--run-config",
            run_config,
        ],
        capture_output=True,
        text=True,
    )
    assert render.returncode == 0, render.stderr
    try:
        up = compose(tmp_path, "up", "-d")
        assert up.returncode == 0, up.stderr
        services = {
            c.labels["com.docker.compose.service"]: c
            for c in docker.from_env().containers.list(
                all=True, filters={"label": f"com.docker.compose.project={PROJECT}"}
            )
        }
        submit = services["submit"]
        exit_code = submit.wait(timeout=900)["StatusCode"]  # a real wait, also for one already exited
        logs = submit.logs().decode(errors="replace")
        assert exit_code == 0, logs[-3000:]
        assert "finished:completed" in logs
        (run_dir,) = (tmp_path / "results").glob("*-run*")
        assert (run_dir / "round-1" / "adapter_model.safetensors").is_file()
        assert len(json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["clients"]) == 2
        assert (tmp_path / ".deploy" / "certs" / "ca.crt").is_file()
        assert len(list((tmp_path / ".deploy" / "keys").glob("supernode-*.key"))) == 20
        for service, container in services.items():
            assert_hardened(container, service)
        (secret,) = (m for m in services["model-fetch"].attrs["Mounts"] if m["Destination"] == "/run/secrets/hf_token")
        assert secret["Source"] == "/dev/null" and not secret["RW"]  # no token: huggingface_hub reads none
    finally:
        down = compose(tmp_path, "down", "-v")
        assert down.returncode == 0, down.stderr


@pytest.mark.parametrize(
    "hosts",
    [
        [Host("localhost", (0,))],
        [Host("localhost", tuple(range(8)))],
        [Host("a", (0, 1)), Host("b", (0,))],
        [Host("cpu")],
    ],
    ids=["1gpu", "8gpu", "2hosts", "cpu"],
)
@pytest.mark.parametrize("request_kind", ["nvidia", "cdi"])
def test_docker_compose_accepts_every_rendered_file(hosts, request_kind, tmp_path, docker_engine):
    for path in write(plan(20, hosts), tmp_path, RenderOptions(gpu_request=request_kind)):
        done = subprocess.run(["docker", "compose", "-f", str(path), "config", "-q"], capture_output=True, text=True)
        assert done.returncode == 0, f"{path.name}: {done.stderr}"
