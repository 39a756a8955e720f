"""End to end on a real Docker engine: `deploy up` a CPU stack of 20 SuperNode containers
with TLS, run the app with `flwr run . remote-deployment`, then `deploy down`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import docker
import pytest

from deploy.backends.docker import LABEL
from deploy.compose import PROJECT
from deploy.flwr_cli import FlwrCli
from tests.conftest import ROOT, assert_adapter_trained
from tests.test_docker_compose_up import toml_value


def deploy(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deploy", "--app", str(ROOT), *args], env=env, text=True, capture_output=True)


@pytest.fixture(scope="module")
def stack(demo, tmp_path_factory, docker_engine):
    workdir = tmp_path_factory.mktemp("stack")
    env = {**os.environ, "FLWR_HOME": str(workdir / "flwr-home")}
    client = docker.from_env()
    canary = client.volumes.create("unrelated-volume")  # `down` must leave what it did not create
    overrides = {**demo.run_config(), "model.name": "/demo/tiny-gemma2", "dataset.data-files": "/demo/alpaca.json"}
    run_config = " ".join(f"{k}={toml_value(v)}" for k, v in overrides.items())  # the trainers load this model
    layout = ["--gpus", "", "--dir", str(workdir), "--volume", f"{demo.model_dir.parent}:/demo:ro", "--run-config", run_config]
    up = deploy("up", *layout, "--no-submit", "--model", "/demo/tiny-gemma2", "--base-image", docker_engine, env=env)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield workdir, env, client
    finally:
        down = deploy("down", *layout, env=env)
        assert down.returncode == 0, down.stderr
        leftovers = (
            client.containers.list(all=True, filters={"label": f"{LABEL}={PROJECT}"})
            + client.networks.list(filters={"label": f"{LABEL}={PROJECT}"})
            + client.volumes.list(filters={"label": f"{LABEL}={PROJECT}"})
        )
        assert leftovers == []
        client.volumes.get("unrelated-volume")
        canary.remove()


def test_status_shows_every_service_running(stack):
    workdir, env, _ = stack
    status = deploy("status", "--gpus", "", "--dir", str(workdir), env=env)
    lines = status.stdout.splitlines()[1:]
    states = {line.split()[0]: line.split()[1:] for line in lines}
    assert states["superlink"] == ["running", "healthy"]
    assert states["trainer-cpu"][0] == "running"
    for one_shot in ("setup", "register-nodes", "model-fetch"):
        assert states[one_shot][0] == "exited", one_shot
    logs = deploy("logs", "register-nodes", "--gpus", "", "--dir", str(workdir), env=env)
    assert logs.returncode == 0 and "20 SuperNode keys registered" in logs.stdout
    assert sum(1 for name, s in states.items() if name.startswith("supernode-") and s[0] == "running") == 20


@pytest.mark.parametrize("use_flexlora", [0, 1], ids=["fedavg", "flexlora"])
def test_two_rounds_over_tls(stack, demo, use_flexlora, tmp_path):
    workdir, env, _ = stack
    config = (workdir / "flwr-home" / "config.toml").read_text()
    assert "remote-deployment" in config and "root-certificates" in config and "insecure" not in config
    cli = FlwrCli(Path(sys.executable).parent / "flwr", workdir / "flwr-home", "remote-deployment", env)
    overrides = {
        **demo.run_config(),
        "model.name": "/demo/tiny-gemma2",
        "dataset.data-files": "/demo/alpaca.json",
        "num-server-rounds": 2,
        "strategy.use-flexlora": use_flexlora,
    }
    before = set((workdir / "results").glob("*-run*"))
    run_id = cli.submit(ROOT, overrides, tmp_path)
    cli.stream_logs(run_id)
    status, details = cli.wait_finished(run_id, timeout=60)
    assert status == "finished:completed", details
    (run_dir,) = set((workdir / "results").glob("*-run*")) - before
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [len(r["clients"]) for r in rounds] == [2, 2]
    # The trainer-cpu container served every training and loaded the model once.
    clients = [c for r in rounds for c in r["clients"]]
    assert {c["trainer-model-loads"] for c in clients} == {1} and len({c["trainer-pid"] for c in clients}) == 1
    assert_adapter_trained(demo, run_dir, final_round=2)
