"""Kits and a Swarm stack on three separate Docker engines of this machine (tests/engines.py): the
SuperLink and ServerApp on `a` (`--server-host`), the 20 SuperNodes over `b` and `c`, the tiny
model. Each way runs 3 rounds of FedAvg and 3 of FlexLoRA, then loses `c` mid-round and must
finish on `b`'s nodes. Opt-in, `--engines` (tests/conftest.py; time in docs/development.md);
what each test measured is printed (`-rP` shows it)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import docker
from app.report import markdown, summarize
from deploy.cli import main
from deploy.flwr_cli import Connection, FlwrCli, register_connection
from deploy.images import IMAGES, build_images, outdated_images
from tests.conftest import ROOT
from tests.engines import Engine, Lan
from tests.test_docker_compose_up import toml_value

pytestmark = [pytest.mark.docker, pytest.mark.timeout(3600)]

NAMES = ("a", "b", "c")  # a: the server host; b and c: 10 SuperNodes each (node i on b if i is even)
NODES = 20
LAYOUT = ["--server-host", "a", "--host", "b", "--host", "c"]
MODEL = "/demo/tiny-gemma2"


def overrides(demo, **more) -> dict:
    """The tiny model, as the containers see it (the demo folder is bound at /demo everywhere)."""
    return {**demo.run_config(), "model.name": MODEL, "dataset.data-files": "/demo/alpaca.json", **more}


def stack_args(demo, engine_a: Engine, **more) -> list[str]:
    run_config = " ".join(f"{k}={toml_value(v)}" for k, v in overrides(demo, **more).items())
    volume = f"{demo.model_dir.parent}:/demo:ro"
    return [*LAYOUT, "--superlink-address", engine_a.address, "--volume", volume, "--model", MODEL,
            "--run-config", run_config]  # fmt: skip


@pytest.fixture(scope="module")
def images(docker_engine, tmp_path_factory) -> Path:
    """One archive of both images from the host's engine, built there first if missing or stale."""
    if outdated_images(docker.from_env(), ROOT):
        build_images(ROOT, docker_engine)
    archive = tmp_path_factory.mktemp("images") / "images.tar"
    subprocess.run(["docker", "save", "-o", str(archive), *IMAGES.values()], check=True)
    return archive


@pytest.fixture(scope="module")
def engines(images) -> Iterator[tuple[Engine, ...]]:
    root = Path(tempfile.mkdtemp(prefix="fte-", dir="/tmp"))  # short: unix socket paths
    started: list[Engine] = []
    try:
        lan = Lan()
        for index, name in enumerate(NAMES):
            started.append(Engine(name, index, root / name, lan))
            started[-1].start()
        began = time.monotonic()
        for engine in started:
            engine.load(images)
        size = images.stat().st_size / 2**30
        print(f"images ({size:.2f} GiB) loaded into 3 engines in {time.monotonic() - began:.0f} s")
        yield tuple(started)
    finally:
        for engine in started:
            engine.remove()
        Lan.remove()
        shutil.rmtree(root, ignore_errors=True)


def flwr(flwr_home: Path, name: str, address: str, ca: Path) -> FlwrCli:
    register_connection(flwr_home, Connection(name, address, ca))
    return FlwrCli(Path(sys.executable).parent / "flwr", flwr_home, name, dict(os.environ))


def rounds_of(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def wait_for(what: str, found: Callable[[], object], timeout: float = 900) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := found():
            return value
        time.sleep(2)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


def run_and_lose_c(cli: FlwrCli, demo, scratch: Path, c: Engine, results: Callable[[], list[Path]]) -> Path:
    """A FedAvg run of 3 rounds, half the nodes a round; `c` is lost as round 2 starts."""
    before = set(results())
    half = {"leaderboard": False, "static.strategy.fraction-train": 0.5, "strategy.round-timeout": 300}
    lossy = overrides(demo, **{"num-server-rounds": 3, **half})
    run_id = cli.submit(ROOT, lossy, scratch)
    folder = wait_for("the run's folder", lambda: next(iter(set(results()) - before), None))
    wait_for("round 1", lambda: results() and (folder / "metrics.jsonl").exists() and rounds_of(folder))
    lost_at = time.monotonic()
    c.lose()
    status, details = cli.wait_finished(run_id, timeout=900)
    assert status == "finished:completed", details
    print(f"c lost as round 2 started; the run completed {time.monotonic() - lost_at:.0f} s later")
    return folder


def assert_lost_nodes_named(folder: Path) -> None:
    """After the loss, c's nodes (odd partitions, where known) fail, each named by its node id in the
    run's metrics and report, and only b's nodes train (round 2 had sampled c's before the loss)."""
    rounds = rounds_of(folder)
    assert len(rounds) == 3
    failed = [f for r in rounds[1:] for f in r["failed"]]
    assert failed and all(f["partition-id"] % 2 == 1 for f in failed if f["partition-id"] is not None), failed
    trained = [c["partition-id"] for r in rounds[2:] for c in r["clients"]]
    assert trained and all(p % 2 == 0 for p in trained), trained
    assert not {f["node-id"] for f in failed} & {c["node-id"] for r in rounds[1:] for c in r["clients"]}
    summary = markdown(summarize(folder))  # this tree's report, whatever the image's ServerApp wrote
    assert all(f"node {f['node-id']} (partition" in summary for f in failed), summary
    print("nodes lost:", sorted({(f["node-id"], f["partition-id"], f["reason"][:60]) for f in failed}))


def assert_three_rounds(folder: Path) -> None:
    rounds = rounds_of(folder)
    assert [len(r["clients"]) for r in rounds] == [2, 2, 2] and not any(r["failed"] for r in rounds), rounds


def test_kits_on_three_engines_then_a_host_lost_mid_round(engines, demo, tmp_path):
    a, b, c = engines
    kits = tmp_path / "kits"
    first = stack_args(demo, a, **{"num-server-rounds": 3})  # the run `submit` starts: FedAvg
    assert main(["--app", str(ROOT), "kit", *first, "--dir", str(tmp_path / "here"), "--out", str(kits)]) == 0

    def compose(engine: Engine, *args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "DOCKER_HOST": engine.url}
        return subprocess.run(["docker", "compose", *args], cwd=kits / engine.name, env=env, capture_output=True)

    began = time.monotonic()
    try:
        for engine in engines:
            done = compose(engine, "up", "-d")
            assert done.returncode == 0, done.stderr.decode()[-2000:]
        cli = flwr(tmp_path / "flwr-home", "kits", f"{a.address}:8000", kits / "a" / "certs" / "ca.crt")
        cli.wait_for_nodes(NODES, timeout=600, alive=lambda: None)
        print(f"kits: `docker compose up -d` on a, b, c to {NODES} SuperNodes online: {time.monotonic() - began:.0f} s")

        def results() -> list[Path]:
            return sorted((kits / "a" / "results").glob("*-run*"))

        submit = a.client().containers.get("flowertune-submit-1")
        assert submit.wait(timeout=900)["StatusCode"] == 0, submit.logs(tail=30).decode()
        (fedavg,) = results()
        assert_three_rounds(fedavg)
        run_id = cli.submit(ROOT, overrides(demo, **{"num-server-rounds": 3, "strategy.use-flexlora": 1}), tmp_path)
        assert cli.wait_finished(run_id, timeout=900)[0] == "finished:completed"
        assert_three_rounds(sorted(set(results()) - {fedavg})[0])
        print(f"kits: 3 rounds FedAvg and 3 FlexLoRA done {time.monotonic() - began:.0f} s after up")
        assert_lost_nodes_named(run_and_lose_c(cli, demo, tmp_path, c, results))
    finally:
        for engine in (a, b):
            compose(engine, "down", "-v")
        c.start()  # back, for the swarm: its containers went with it, its volumes not
        compose(c, "down", "-v")


def results_in_swarm(a: Engine, into: Path) -> list[Path]:
    """The ServerApp's results volume, copied out of its container on a."""
    (serverapp,) = a.client().containers.list(filters={"label": "com.docker.swarm.service.name=flowertune_serverapp"})
    stream, _ = serverapp.get_archive("/app/results")
    shutil.rmtree(into, ignore_errors=True)
    with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
        tar.extractall(into, filter="data")
    return sorted((into / "results").glob("*-run*"))


def test_a_swarm_over_three_engines_then_a_worker_lost_mid_round(engines, demo, tmp_path):
    a, b, c = engines
    manager = a.client()
    manager.swarm.init(advertise_addr=a.address, listen_addr=f"{a.address}:2377")
    token = manager.swarm.attrs["JoinTokens"]["Worker"]
    for worker in (b, c):
        worker.client().swarm.join([f"{a.address}:2377"], token, listen_addr=f"{worker.address}:2377",
                                   advertise_addr=worker.address)  # fmt: skip
    env = {**os.environ, "DOCKER_HOST": a.url, "FLWR_HOME": str(tmp_path / "flwr-home")}
    layout = [*stack_args(demo, a, **{"num-server-rounds": 3}), "--dir", str(tmp_path / "here"), "--overlay", "plain"]

    def deploy(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "deploy", "--app", str(ROOT), *args, "--engine", "swarm", *layout]
        return subprocess.run(command, env=env, capture_output=True, text=True)

    try:
        began = time.monotonic()
        up = deploy("up", "--connection", "swarm")
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
        print(f"swarm: `deploy up --engine swarm` to {NODES} SuperNodes online: {time.monotonic() - began:.0f} s")
        print(up.stdout)
        status = deploy("status")
        rows = {line.split()[0]: line.split()[1:] for line in status.stdout.splitlines()[1:]}
        for i in range(NODES):
            assert rows[f"supernode-{i}"] == ["bc"[i % 2], "bc"[i % 2], "running"], rows
        assert rows["superlink"][:2] == ["a", "a"] and rows["serverapp"][:2] == ["a", "a"]
        cli = FlwrCli(Path(sys.executable).parent / "flwr", tmp_path / "flwr-home", "swarm", env)

        def results() -> list[Path]:
            return results_in_swarm(a, tmp_path / "copied")

        submit = manager.services.get("flowertune_submit")
        states = wait_for(
            "submit's run", lambda: {t["Status"]["State"] for t in submit.tasks()} & {"complete", "failed"}
        )
        assert states == {"complete"}, submit.logs(stdout=True, stderr=True, tail=30)
        (fedavg,) = results()
        assert_three_rounds(fedavg)
        run_id = cli.submit(ROOT, overrides(demo, **{"num-server-rounds": 3, "strategy.use-flexlora": 1}), tmp_path)
        assert cli.wait_finished(run_id, timeout=900)[0] == "finished:completed"
        print(f"swarm: 3 rounds FedAvg and 3 FlexLoRA done {time.monotonic() - began:.0f} s after up")
        lost = run_and_lose_c(cli, demo, tmp_path, c, results)
        results()  # the copy as the run left it
        assert_lost_nodes_named(lost)
        after = deploy("status")
        print("swarm status after c was lost:\n" + after.stdout)
        nodes = {n.attrs["Description"]["Hostname"]: n.attrs["Status"]["State"] for n in manager.nodes.list()}
        print(f"swarm nodes: {nodes}")
        assert nodes["c"] == "down"
    finally:
        down = deploy("down")
        print(down.stdout + down.stderr)
        stack = {"label": "com.docker.stack.namespace"}
        left = [*manager.services.list(), *manager.secrets.list(), *manager.networks.list(filters=stack)]
        assert down.returncode == 0 and left == [], left
