"""End to end on a real Docker engine: `deploy up` a CPU stack of 20 SuperNode containers
with TLS and a (fake) Hugging Face token, run the app with `flwr run . remote-deployment`,
check how the containers run, scan everything the runs left for the token and private
keys, then `deploy down`."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import docker
from deploy.backends.docker import LABEL, prepare_host_folder
from deploy.compose import PROJECT
from deploy.flwr_cli import FlwrCli
from tests.conftest import ROOT, assert_adapter_trained
from tests.test_docker_compose_up import assert_hardened, toml_value
from tests.test_secret_scan import scan_bytes, scan_images, scan_tree

pytestmark = pytest.mark.docker


def deploy(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deploy", "--app", str(ROOT), *args], env=env, text=True, capture_output=True
    )


def containers(client) -> list:
    return client.containers.list(all=True, filters={"label": f"{LABEL}={PROJECT}"})


@pytest.fixture(scope="module")
def hf_token() -> str:
    """Random, so finding it anywhere can only mean it leaked from this stack."""
    return f"hf_{secrets.token_hex(16)}"


def token_file(folder: Path, token: str) -> Path:
    """Where a user keeps the token: a file only the images' user (uid 1000) can read."""
    path = folder / "hf_token"
    folder.mkdir()
    path.write_text(token)
    path.chmod(0o400)
    prepare_host_folder(folder)
    return path


@pytest.fixture(scope="module")
def stack(demo, tmp_path_factory, docker_engine, hf_token):
    workdir = tmp_path_factory.mktemp("stack")
    env = {
        **os.environ,
        "FLWR_HOME": str(workdir / "flwr-home"),
        "HF_TOKEN_FILE": str(token_file(workdir / "secrets", hf_token)),
        "HF_TOKEN": hf_token,  # also in the shell, as users have it: it must not reach a container
    }
    client = docker.from_env()
    canary = client.volumes.create("unrelated-volume")  # `down` must leave what it did not create
    overrides = {**demo.run_config(), "model.name": "/demo/tiny-gemma2", "dataset.data-files": "/demo/alpaca.json"}
    run_config = " ".join(f"{k}={toml_value(v)}" for k, v in overrides.items())  # the trainers load this model
    layout = [
        "--gpus",
        "",
        "--dir",
        str(workdir),
        "--volume",
        f"{demo.model_dir.parent}:/demo:ro",
        "--run-config",
        run_config,
    ]
    up = deploy("up", *layout, "--no-submit", "--model", "/demo/tiny-gemma2", "--base-image", docker_engine, env=env)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield workdir, env, client
    finally:
        down = deploy("down", *layout, env=env)
        assert down.returncode == 0, down.stderr
        leftovers = (
            containers(client)
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


@dataclass(frozen=True)
class Run:
    status: str
    details: str
    folder: Path
    serverapp_log: str


@pytest.fixture(scope="module")
def runs(stack, demo, tmp_path_factory) -> dict[int, Run]:
    """A FedAvg and a FlexLoRA job of 2 rounds each, once for every test that reads them."""
    workdir, env, _ = stack
    cli = FlwrCli(Path(sys.executable).parent / "flwr", workdir / "flwr-home", "remote-deployment", env)
    done = {}
    for use_flexlora in (0, 1):
        overrides = {
            **demo.run_config(),
            "model.name": "/demo/tiny-gemma2",
            "dataset.data-files": "/demo/alpaca.json",
            "num-server-rounds": 2,
            "strategy.use-flexlora": use_flexlora,
        }
        before = set((workdir / "results").glob("*-run*"))
        run_id = cli.submit(ROOT, overrides, tmp_path_factory.mktemp("submit"))
        cli.stream_logs(run_id)
        status, details = cli.wait_finished(run_id, timeout=60)
        (folder,) = set((workdir / "results").glob("*-run*")) - before
        done[use_flexlora] = Run(status, details, folder, cli.log(run_id))
    return done


@pytest.mark.parametrize("use_flexlora", [0, 1], ids=["fedavg", "flexlora"])
def test_two_rounds_over_tls(stack, demo, runs, use_flexlora):
    workdir, _, _ = stack
    config = (workdir / "flwr-home" / "config.toml").read_text()
    assert "remote-deployment" in config and "root-certificates" in config and "insecure" not in config
    run = runs[use_flexlora]
    assert run.status == "finished:completed", run.details
    rounds = [json.loads(line) for line in (run.folder / "metrics.jsonl").read_text().splitlines()]
    assert [len(r["clients"]) for r in rounds] == [2, 2]
    # The trainer-cpu container served every training and loaded the model once.
    clients = [c for r in rounds for c in r["clients"]]
    assert {c["trainer-model-loads"] for c in clients} == {1} and len({c["trainer-pid"] for c in clients}) == 1
    assert_adapter_trained(demo, run.folder, final_round=2)


def test_containers_run_hardened_and_get_the_token_as_a_file_only(stack, hf_token):
    _, _, client = stack
    with_token = set()
    for container in containers(client):
        assert_hardened(container, container.labels[f"{LABEL}.service"])
        assert not any(hf_token in e for e in container.attrs["Config"]["Env"]), container.name
        if any(m["Destination"] == "/run/secrets/hf_token" and not m["RW"] for m in container.attrs["Mounts"]):
            with_token.add(container.labels[f"{LABEL}.service"])
    assert with_token == {"model-fetch", "trainer-cpu", "serverapp"}  # what downloads from the hub
    # huggingface_hub finds the token through HF_TOKEN_PATH; compared by digest, so no exec carries it.
    read = (
        "import hashlib; from huggingface_hub import get_token; print(hashlib.sha256(get_token().encode()).hexdigest())"
    )
    code, out = client.containers.get(f"{PROJECT}-trainer-cpu").exec_run(["python", "-c", read])
    assert (code, out.decode().strip()) == (0, hashlib.sha256(hf_token.encode()).hexdigest())


def test_only_the_superlink_sees_its_key_and_no_running_container_the_ca_key(stack):
    """What each running container finds in /certs and /keys (the folders hold every file)."""
    _, _, client = stack
    seen: dict[str, set[str]] = {}
    for container in containers(client):
        if container.status == "running":
            _, out = container.exec_run(["sh", "-c", "ls -A /certs /keys 2>/dev/null; true"])
            seen[container.labels[f"{LABEL}.service"]] = set(out.decode().split()) - {"/certs:", "/keys:"}
    assert seen.pop("superlink") == {"ca.crt", "superlink.crt", "superlink.key", "superexec.secret"}
    assert seen.pop("serverapp") == {"ca.crt", "superexec.secret"}
    assert seen.pop("trainer-cpu") == set()
    supernodes = {service: seen.pop(service) for service in list(seen) if service.startswith("supernode-")}
    assert supernodes and all(files == {"ca.crt", "node.key"} for files in supernodes.values())
    assert seen == {}, "a running service the test does not know"


COUNT_ZOMBIES = """
import os
zombies = 0
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        zombies += open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:  # gone meanwhile
        pass
print(zombies)
"""


def test_the_processes_flower_starts_leave_no_zombies(stack, runs):
    """After two runs: the ServerApps and ClientApps that Flower's SuperExecs started and
    never waited for were reaped (deploy.reaped) in every running container."""
    _, _, client = stack
    zombies = {}
    for container in containers(client):
        if container.status == "running":
            code, out = container.exec_run(["python", "-c", COUNT_ZOMBIES])
            assert code == 0, out.decode()
            zombies[container.labels[f"{LABEL}.service"]] = int(out)
    assert {"serverapp", "supernode-0"} <= set(zombies) and set(zombies.values()) == {0}, zombies


def test_the_serverapp_runs_with_no_data_and_no_weights(stack, runs):
    _, _, client = stack
    serverapp = client.containers.get(f"{PROJECT}-serverapp")
    mounts = {m["Destination"] for m in serverapp.attrs["Mounts"]}
    assert mounts == {
        "/app/results",
        "/certs/ca.crt",
        "/certs/superexec.secret",
        "/run/secrets/hf_token",
        "/demo/tiny-gemma2/config.json",
    }
    code, out = serverapp.exec_run(["ls", "-A", "/demo", "/demo/tiny-gemma2"])
    assert (code, out.decode().split()) == (0, ["/demo:", "tiny-gemma2", "/demo/tiny-gemma2:", "config.json"])
    assert {run.status for run in runs.values()} == {"finished:completed"}  # served by that ServerApp


def test_no_token_or_private_key_in_images_logs_or_results(stack, runs, hf_token):
    """The images (every layer, config and history), every container's log and inspect record,
    the ServerApp logs the SuperLink keeps, and what the runs wrote on the host."""
    workdir, _, client = stack
    token = hf_token.encode()
    found = scan_images(sorted({c.image.id for c in containers(client)}), token)
    for container in containers(client):
        found += scan_bytes(container.logs(), f"log of {container.name}", token)
        found += scan_bytes(json.dumps(container.attrs).encode(), f"docker inspect {container.name}", token)
    for run in runs.values():
        found += scan_bytes(run.serverapp_log.encode(), f"ServerApp log of {run.folder.name}", token)
    found += scan_tree(workdir / "results", token) + scan_tree(workdir / "flwr-home", token)
    assert found == []
