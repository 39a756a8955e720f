"""A real local deployment: one SuperLink and 20 SuperNodes as processes, on the CPU.

Both aggregations run three rounds each, through `flwr run`, on a deployment whose warm trainer
serves the nodes; FedAvg runs again on one whose ClientApps train themselves. Tests of what the
ServerApp alone decides run on the trainer layout only; those where the ClientApp's own process
matters (its failures, its stopping) run on both.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from app.trainer_client import ping
from deploy.backends.process import ProcessDeployment, free_port
from deploy.cli import run_on
from deploy.errors import DeployError
from deploy.project import resolve_run_config
from deploy.topology import Host, plan
from tests.conftest import ROOT, assert_adapter_trained

NODES = 20
TRAINER = "cpu-0"


@pytest.fixture(scope="module", params=["trainer", "in-process"])
def deployment(request, demo, tmp_path_factory):
    trainers = None if request.param == "trainer" else 0
    topology = plan(NODES, [Host("localhost")], superlink_port=free_port(), nodes_per_round=2, trainers=trainers)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    sent, _ = resolve_run_config(ROOT, demo.run_config())
    workdir = tmp_path_factory.mktemp(request.param)
    with ProcessDeployment(topology, workdir, env, app_dir=ROOT, run_config=sent) as started:
        yield started


def run(deployment, demo, results, timeout: float = 60, **overrides):
    """Submits a run of the tiny model and waits for it; returns its folder and rounds."""
    sent, _ = resolve_run_config(ROOT, {**demo.run_config(), "results.dir": str(results), **overrides})
    run_id = deployment.cli.submit(ROOT, sent, results)
    deployment.cli.stream_logs(run_id)
    status, details = deployment.cli.wait_finished(run_id, timeout=timeout)
    assert status == "finished:completed", details
    (run_dir,) = results.glob("*-run*")
    return run_dir, [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _rounds_lost(planned: int, rounds: list[dict]) -> int:
    """Planned rounds that aggregated no update: missing from metrics.jsonl, or with no client."""
    return planned - sum(1 for r in rounds if r["clients"])


def _layout(deployment) -> str:
    return "trainer" if deployment.topology.trainers else "in-process"


@pytest.mark.deployment
@pytest.mark.parametrize(
    ("deployment", "use_flexlora"),
    # The aggregation is the ServerApp's, the same for both layouts: FlexLoRA runs once, on the trainer.
    [("trainer", 0), ("trainer", 1), ("in-process", 0)],
    ids=["trainer-fedavg", "trainer-flexlora", "in-process-fedavg"],
    indirect=["deployment"],
)
def test_three_rounds(deployment, demo, tmp_path, capfd, use_flexlora):
    run_dir, rounds = run(
        deployment,
        demo,
        tmp_path,
        **{"num-server-rounds": 3, "strategy.use-flexlora": use_flexlora, "train.save-every-round": 2},
    )
    assert [r["round"] for r in rounds] == [1, 2, 3]
    partitions = []
    for r in rounds:
        assert r["aggregation"] == ("flexlora" if use_flexlora else "fedavg")
        assert len(r["clients"]) == 2 and r["rejected"] == [] and r["failed"] == []
        ids = {c["partition-id"] for c in r["clients"]}
        assert len(ids) == 2 and ids <= set(range(NODES))
        partitions.append(frozenset(ids))
        assert r["aggregate"]["train-loss"] > 0
    assert len(set(partitions)) > 1, "every round trained the same partitions"
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "loss.png",
        "metrics.jsonl",
        "resume.json",
        "round-0",
        "round-2",
        "round-3",
        "round_time.png",
        "run.json",
        "state",
        "summary.json",
        "summary.md",
    ]
    assert_adapter_trained(demo, run_dir, final_round=3)
    # The byte figures are the packed adapters that really crossed: the global one down, each update up.
    # bfloat16 on the wire: two bytes a value instead of four, and the header (most of this tiny adapter).
    from safetensors.torch import load_file

    from app.wire import encode

    initial = load_file(run_dir / "round-0" / "adapter_model.safetensors")
    adapter_bytes = len(encode(initial, "bfloat16"))
    assert adapter_bytes < 0.6 * len(encode(initial, "float32"))
    assert {c["bytes-to-client"] for r in rounds for c in r["clients"]} == {adapter_bytes}
    assert {c["bytes-from-client"] for r in rounds for c in r["clients"]} == {adapter_bytes}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds-completed"] == summary["rounds-planned"] == 3
    assert summary["bytes"]["total"] == 2 * 6 * adapter_bytes
    # The ServerApp's progress line, as `flwr log` streams it to whoever submitted the run.
    streamed = capfd.readouterr().out
    assert "round 1/3: partition" in streamed and "round 3/3: partition" in streamed and "ETA 0 s" in streamed

    clients = [c for r in rounds for c in r["clients"]]
    logs = "".join(p.read_text() for p in (deployment.workdir / "logs").glob("supernode-*.log"))
    if deployment.topology.trainers:
        # One trainer process served all six trainings and loaded the model once, at its start.
        status = ping(deployment.trainer_dir, TRAINER, timeout=10)
        assert {c["trainer-pid"] for c in clients} == {status["pid"]}
        assert {c["trainer-model-loads"] for c in clients} == {1} and status["model-loads"] == 1
        assert f"trained on warm trainer {TRAINER}" in logs and "training in this ClientApp process" not in logs
    else:
        assert not any("trainer-pid" in c for c in clients)
        assert "training in this ClientApp process" in logs and "warm trainer" not in logs
    # A clean console: no per-process notice from bitsandbytes about an optional CPU kernel.
    every_log = "".join(p.read_text() for p in (deployment.workdir / "logs").glob("*.log")) + streamed
    assert "gemm_4bit_forward" not in every_log
    # Flower's SuperExecs never wait for the ClientApps and the ServerApp they start; run under
    # deploy.reaped, those exited processes left no zombie behind.
    assert _lasting_zombies(deployment.pids()) == []


@pytest.mark.deployment
@pytest.mark.parametrize("deployment", ["trainer"], indirect=True)
def test_trainers_start_before_the_superlink_and_the_start_up_is_timed(deployment):
    """The trainers' imports and model load are a start-up's longest part on a GPU host:
    started before the SuperLink, they overlap its start and the SuperNodes'. This deployment
    waits for them in up(), as `deploy up --backend process` does; `deploy run`'s, which does
    not, is timed in test_deploy_run_submits_the_run_while_the_trainer_still_loads."""
    names = (deployment.topology.trainers[0].name, "superlink", deployment.topology.nodes[0].name)
    created = [psutil.Process(deployment.pid_of(name)).create_time() for name in names]
    assert created == sorted(created), dict(zip(names, created))
    timeline = deployment.timeline
    assert list(timeline) == ["checked", "superlink", "supernodes", "trainers"]
    assert 0 <= timeline["checked"] <= timeline["superlink"] <= timeline["supernodes"] <= timeline["trainers"]


@pytest.mark.deployment
@pytest.mark.parametrize("deployment", ["trainer"], indirect=True)
def test_a_trainer_killed_mid_run_is_restarted_and_the_run_completes(deployment, demo, tmp_path, reliability):
    """Killed while it trains round 2: that node's update fails and is recorded; later rounds
    train on the restarted trainer."""
    victim = ping(deployment.trainer_dir, TRAINER, timeout=10)["pid"]
    log = deployment.workdir / "logs" / "trainer-cpu.log"
    killer = _kill_when(log, re.escape(f"(pid {victim}): round 2, partition"), lambda _: victim)
    # Long enough a training (a few seconds) that the kill lands inside it.
    run_dir, rounds = run(
        deployment, demo, tmp_path, **{"num-server-rounds": 3, "train.training-arguments.max-steps": 40}
    )
    assert killer() is not None
    assert [len(r["clients"]) + len(r["failed"]) for r in rounds] == [2, 2, 2]
    assert len(rounds[1]["failed"]) == 1 and "ended during the request" in rounds[1]["failed"][0]["reason"]
    restarted = ping(deployment.trainer_dir, TRAINER, timeout=10)["pid"]
    assert restarted != victim
    assert {c["trainer-pid"] for c in rounds[2]["clients"]} == {restarted}
    assert_adapter_trained(demo, run_dir, final_round=3)
    reliability.record(
        "fault",
        "the warm trainer SIGKILLed while it trains round 2 of 3",
        f"round 2 aggregated {len(rounds[1]['clients'])} update and recorded {len(rounds[1]['failed'])} failed "
        f"({rounds[1]['failed'][0]['reason']}); "
        f"round 3 trained on the restarted trainer; rounds in metrics.jsonl: {[r['round'] for r in rounds]}",
        rounds_lost=_rounds_lost(3, rounds),
    )


def _kill_when(log, pattern: str, victim):
    """Watches what `log` gets from now on, in a thread, for `pattern`; then SIGKILLs the
    pid `victim(match)` names. The returned call gives that match (None: no kill)."""
    killed: list[re.Match] = []
    start = len(log.read_text())

    def watch() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if match := re.search(pattern, log.read_text()[start:]):
                os.kill(victim(match), signal.SIGKILL)
                killed.append(match)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()

    def result() -> re.Match | None:
        thread.join(10)
        return killed[0] if killed else None

    return result


@pytest.mark.deployment
def test_a_supernode_killed_while_it_trains_is_restarted_and_the_run_completes(demo, tmp_path, reliability):
    """Four nodes, every one sampled each round (leaderboard=false). In round 2 the node
    whose partition is training is SIGKILLed: the round aggregates the other three and
    records the failure under the node's own id and partition; the deployment restarts
    the node, which rejoins under a new id and trains its partition in round 3."""
    nodes = 4
    overrides = {
        **demo.run_config(),
        "leaderboard": False,
        "static.dataset.num-partitions": nodes,
        "static.strategy.fraction-train": 1.0,
        "strategy.round-timeout": 45,
        "train.training-arguments.max-steps": 40,  # a training of a few seconds, for the kill to land in
    }
    sent, _ = resolve_run_config(ROOT, overrides)
    topology = plan(nodes, [Host("localhost")], superlink_port=free_port(), nodes_per_round=1)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with ProcessDeployment(topology, tmp_path / "deployment", env, app_dir=ROOT, run_config=sent) as deployment:
        log = deployment.workdir / "logs" / "trainer-cpu.log"
        killer = _kill_when(
            log, r"round 2, partition (\d+): training", lambda m: deployment.pid_of(f"supernode-{m[1]}")
        )
        (tmp_path / "results").mkdir()
        run_dir, rounds = run(
            deployment, demo, tmp_path / "results", timeout=300, **{**overrides, "num-server-rounds": 3}
        )
        match = killer()
        assert match is not None
        victim = int(match[1])
        restarts = deployment.restarts()
        assert restarts == {f"supernode-{victim}": 1}
    by_partition = [{c["partition-id"]: c["node-id"] for c in r["clients"]} for r in rounds]
    assert sorted(by_partition[0]) == list(range(nodes))
    (failure,) = rounds[1]["failed"]
    assert failure["node-id"] == by_partition[0][victim] and failure["partition-id"] == victim
    assert sorted(by_partition[1]) == sorted(set(range(nodes)) - {victim})
    assert sorted(by_partition[2]) == list(range(nodes))
    assert by_partition[2][victim] != by_partition[0][victim], "the restarted node rejoins under a new id"
    # Until Flower marks the dead id offline (two missed 30 s heartbeats) it may be sampled
    # once more; its message then fails at once as unavailable, never stalling the round.
    assert all(f["node-id"] == failure["node-id"] and "Node Unavailable" in f["reason"] for f in rounds[2]["failed"])
    assert_adapter_trained(demo, run_dir, final_round=3)
    reliability.record(
        "fault",
        f"a SuperNode SIGKILLed while it trains round 2 of 3 ({nodes} nodes, all sampled)",
        f"round 2 aggregated {len(by_partition[1])} partitions and recorded the killed node's as failed "
        f"({failure['reason']}); the node restarted {sum(restarts.values())} time; "
        f"round 3 trained {len(by_partition[2])} partitions",
        rounds_lost=_rounds_lost(3, rounds),
    )


@pytest.mark.deployment
@pytest.mark.parametrize("deployment", ["trainer"], indirect=True)
def test_a_killed_serverapp_is_resumed_from_its_last_completed_round(deployment, demo, tmp_path, reliability):
    """The ServerApp is SIGKILLed once round 2's state is saved; a run submitted with
    results.resume-from continues in the same folder at round 3 (its learning rate and
    checkpoint number), and rounds 1 and 2 stay exactly as they were."""
    overrides = {"num-server-rounds": 3, "train.save-every-round": 2, "train.training-arguments.max-steps": 20}
    sent, _ = resolve_run_config(ROOT, {**demo.run_config(), "results.dir": str(tmp_path), **overrides})
    deployment.cli.submit(ROOT, sent, tmp_path)
    run_dir = _wait_for_saved_round(tmp_path, 2)
    _serverapp().kill()
    before = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][:2]
    assert [r["round"] for r in before] == [1, 2]

    resumed, rounds = run(deployment, demo, tmp_path, **overrides, **{"results.resume-from": str(run_dir)})
    assert resumed == run_dir
    assert [r["round"] for r in rounds] == [1, 2, 3] and rounds[:2] == before
    assert json.loads((run_dir / "resume.json").read_text())["round"] == 3
    assert sorted(p.name for p in (run_dir / "state").iterdir()) == ["round-3"]
    trainer_log = (deployment.workdir / "logs" / "trainer-cpu.log").read_text()
    assert "round 3, partition" in trainer_log
    assert_adapter_trained(demo, run_dir, final_round=3)
    kept = [a["round"] for a, b in zip(before, rounds) if a == b]
    reliability.record(
        "fault",
        "the ServerApp SIGKILLed after round 2 of 3, then the run resumed with results.resume-from",
        f"resumed in the same folder; rounds {kept} kept unchanged in metrics.jsonl, "
        f"round {rounds[-1]['round']} trained; "
        f"resume.json at round {json.loads((run_dir / 'resume.json').read_text())['round']}",
        rounds_lost=_rounds_lost(3, rounds) + len(before) - len(kept),
    )


def _wait_for_saved_round(results, round_: int, timeout: float = 120):
    """The run folder, once its resume state holds `round_`."""
    deadline = time.monotonic() + timeout
    while not (state := list(results.glob("*-run*/resume.json"))) or json.loads(state[0].read_text())["round"] < round_:
        assert time.monotonic() < deadline, f"round {round_} never completed"
        time.sleep(0.1)
    return state[0].parent


def _serverapp() -> psutil.Process:
    """The one ServerApp process running (each test's runs are one at a time)."""
    (server,) = [p for p in psutil.process_iter(["cmdline"]) if "flwr-serverapp" in " ".join(p.info["cmdline"] or ())]
    return server


@pytest.mark.deployment
def test_a_killed_superlink_loses_no_completed_round(demo, tmp_path, reliability):
    """The SuperLink is SIGKILLed once round 2's state is saved; its state dies with it
    (the process backend starts each federation afresh). A new deployment resumes the run
    from its folder: rounds 1 and 2 stay as they were, round 3 trains. Two partitions,
    every node sampled, each ClientApp training itself, to keep the two starts short."""
    federation = {"leaderboard": False, "static.dataset.num-partitions": 2, "static.strategy.fraction-train": 1.0}
    overrides = {**federation, "num-server-rounds": 3, "train.training-arguments.max-steps": 20}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    sent, _ = resolve_run_config(ROOT, {**demo.run_config(), **federation})

    def deployment(name: str) -> ProcessDeployment:
        topology = plan(2, [Host("localhost")], superlink_port=free_port(), nodes_per_round=2, trainers=0)
        return ProcessDeployment(topology, tmp_path / name, env, app_dir=ROOT, run_config=sent)

    results = tmp_path / "results"
    with deployment("first") as first:
        run_sent, _ = resolve_run_config(ROOT, {**demo.run_config(), "results.dir": str(results), **overrides})
        first.cli.submit(ROOT, run_sent, tmp_path)
        run_dir = _wait_for_saved_round(results, 2)
        server = _serverapp()
        os.kill(first.pid_of("superlink"), signal.SIGKILL)
        # Orphaned by its SuperLink, the ServerApp can reach nothing; Flower's ServerApp
        # does not always end by itself (its exit on a lost parent can hang), so it is
        # stopped by hand, as docs/architecture.md tells users to.
        server.kill()
    before = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in before] == [1, 2]

    with deployment("second") as second:
        resumed, rounds = run(second, demo, results, **overrides, **{"results.resume-from": str(run_dir)})
    assert resumed == run_dir
    assert [r["round"] for r in rounds] == [1, 2, 3] and rounds[:2] == before
    assert len(rounds[2]["clients"]) == 2
    assert_adapter_trained(demo, run_dir, final_round=3)
    reliability.record(
        "fault",
        "the SuperLink SIGKILLed after round 2 of 3; a new deployment resumed the run with results.resume-from",
        f"rounds {[r['round'] for r in before]} kept unchanged in metrics.jsonl, round {rounds[-1]['round']} trained "
        f"by {len(rounds[-1]['clients'])} nodes of the new SuperLink",
        rounds_lost=_rounds_lost(3, rounds),
    )


@pytest.mark.deployment
def test_deploy_run_whose_superlink_dies_stops_everything_and_says_how_to_resume(demo, tmp_path, reliability):
    """`deploy run` with its SuperLink SIGKILLed after round 1 of 6: it stops every process it
    started and ends in one line naming the dead process and the way on, instead of waiting a
    minute on a run status nobody can give and saying "unknown"."""
    results = tmp_path / "results"
    overrides = {
        **demo.run_config(),
        "leaderboard": False,
        "static.dataset.num-partitions": 2,
        "static.strategy.fraction-train": 1.0,
        "num-server-rounds": 6,
        "results.dir": str(results),
    }
    run_config = " ".join(
        f"{k}={json.dumps(v) if isinstance(v, str) else str(v).lower()}" for k, v in overrides.items()
    )
    workdir = tmp_path / "deploy"
    command = [
        sys.executable,
        "-m",
        "deploy",
        "--app",
        str(ROOT),
        "run",
        "--gpus",
        "",
        "--workdir",
        str(workdir),
        "--run-config",
        run_config,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as deploy_run:
        run_dir = _wait_for_saved_round(results, 1, timeout=300)
        server = _serverapp()
        (superlink,) = [
            p for p in psutil.process_iter(["cmdline"]) if str(workdir / "superlink.db") in (p.info["cmdline"] or ())
        ]
        superlink.kill()
        _, stderr = deploy_run.communicate(timeout=120)
    with contextlib.suppress(psutil.NoSuchProcess):
        server.kill()  # Flower's orphaned ServerApp, which docs/architecture.md says to stop by hand
    assert deploy_run.returncode == 2 and stderr.count("\n") == 1, stderr
    assert stderr.startswith("error: superlink exited with code -9: ")
    assert stderr.rstrip().endswith(
        f"saved in the run's folder under {results}: continue with `deploy run --resume FOLDER`"
    )
    assert [p for p in psutil.process_iter(["cmdline"]) if str(workdir) in " ".join(p.info["cmdline"] or ())] == []
    kept = [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert kept[0] == 1 and json.loads((run_dir / "resume.json").read_text())["round"] == kept[-1]
    reliability.record(
        "fault",
        "deploy run with its SuperLink SIGKILLed after round 1 of 6",
        f"deploy run stopped every process it started and exited 2 with one line: "
        f"error: superlink exited with code -9: … continue with `deploy run --resume FOLDER`; rounds {kept} kept",
    )


LOG_TIME = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ "  # a logging line's stamp: no part of an outcome
# Two nodes, both sampled: short starts for the tests of `deploy run`'s order.
TWO_NODES = {"leaderboard": False, "static.dataset.num-partitions": 2, "static.strategy.fraction-train": 1.0}


def _trainer_held_back(tmp_path, until) -> Path:
    """This environment's bin folder, but its `python` starts a `deploy trainer` only once the
    folder `until` holds something (a run's folder: the run is submitted and its ServerApp
    started) or after 120 s: a trainer whose model load outlasts the nodes' start, as a 9B
    model's does on a GPU host, without depending on how fast this machine is."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    real = Path(sys.executable)
    for entry in real.parent.iterdir():
        if entry.name != "python":
            (bin_dir / entry.name).symlink_to(entry)
    python = bin_dir / "python"
    python.write_text(
        "#!/bin/sh\n"
        'case " $* " in *" trainer "*)\n'
        f"  for _ in $(seq 1200); do [ -n \"$(ls -A '{until}')\" ] && break; sleep 0.1; done;;\n"
        "esac\n"
        f"exec '{real}' \"$@\"\n"
    )
    python.chmod(0o755)
    return bin_dir


def _overlapping(tmp_path, sent: dict, bin_dir: Path) -> ProcessDeployment:
    """`deploy run`'s deployment: up once the nodes are online, the trainer still loading."""
    topology = plan(2, [Host("localhost")], superlink_port=free_port(), nodes_per_round=2)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return ProcessDeployment(
        topology, tmp_path / "deploy", env, bin_dir=bin_dir, app_dir=ROOT, run_config=sent, wait_trainers=False
    )


@pytest.mark.deployment
def test_deploy_run_submits_the_run_while_the_trainer_still_loads(demo, tmp_path):
    """`deploy run` submits once the nodes are online: the ServerApp starts while the trainer
    loads (held back here until the run's folder exists), the ClientApps wait for it and the
    run completes on it; the timeline says when the run was submitted and the trainer ready."""
    results = tmp_path / "results"
    results.mkdir()
    sent, config = resolve_run_config(
        ROOT, {**demo.run_config(), **TWO_NODES, "num-server-rounds": 1, "results.dir": str(results)}
    )
    with _overlapping(tmp_path, sent, _trainer_held_back(tmp_path, results)) as deployment:
        status = run_on(deployment, ROOT, sent, config)
        timeline = dict(deployment.timeline)
    assert status == "finished:completed"
    assert list(timeline) == ["checked", "superlink", "supernodes", "submitted", "trainers"], timeline
    assert 0 <= timeline["checked"] <= timeline["superlink"] <= timeline["supernodes"] <= timeline["submitted"]
    assert timeline["submitted"] < timeline["trainers"], timeline
    (run_dir,) = results.glob("*-run*")
    (round_1,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(round_1["clients"]) == 2 and round_1["failed"] == []
    assert {c["trainer-model-loads"] for c in round_1["clients"]} == {1}


@pytest.mark.deployment
def test_a_trainer_that_cannot_load_stops_the_submitted_run_at_once(demo, tmp_path, reliability):
    """A model folder whose weights are not a safetensors file: the settings' check passes (it
    reads the folder, not the weights) and the ServerApp starts (it needs only config.json);
    the trainer dies three times while loading and its supervisor gives up. `deploy run`
    stops the run and the deployment within seconds of that, in one line naming the trainer
    and its log, not after strategy.round-timeout (600 s) of the rounds waiting for it."""
    broken = tmp_path / "broken-model"
    shutil.copytree(demo.model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    results = tmp_path / "results"
    results.mkdir()
    overrides = {**demo.run_config(), **TWO_NODES, "model.name": str(broken), "results.dir": str(results)}
    sent, config = resolve_run_config(ROOT, overrides)
    deployment = _overlapping(tmp_path, sent, _trainer_held_back(tmp_path, results))
    log = deployment.workdir / "logs" / "trainer-cpu.log"
    with pytest.raises(DeployError) as err, deployment:
        try:
            run_on(deployment, ROOT, sent, config)
        finally:
            noticed = time.time()
    gave_up = log.stat().st_mtime  # the supervisor's last line
    message = str(err.value)
    assert noticed - gave_up < 30, f"noticed {noticed - gave_up:.0f} s after the trainer's supervisor gave up"
    assert message.startswith("trainer-cpu exited with code 1: ") and "giving up" in message, message
    assert f"(log: {log})" in message and "\n" not in message
    assert message.endswith("; the run stopped before it completed a round: nothing to resume")
    assert list(results.glob("*-run*")), "the run was submitted and its ServerApp started"
    workdir = str(deployment.workdir)
    assert [p for p in psutil.process_iter(["cmdline"]) if workdir in " ".join(p.info["cmdline"] or ())] == []
    reliability.record(
        "fault",
        "deploy run whose trainer cannot load the model (weights not a safetensors file), the run already submitted",
        f"run stopped {noticed - gave_up:.1f} s after the trainer's supervisor gave up, every process stopped, "
        f"one line: {re.sub(LOG_TIME, '', message)}",
    )


@pytest.mark.deployment
def test_resuming_refuses_other_settings_and_a_finished_run(demo, tmp_path, reliability):
    from flwr.app import ArrayRecord

    from app.checkpoint import ResumeState, RunRecorder
    from app.config import ConfigError
    from app.models import initial_adapter
    from app.strategy import RoundReport

    _, config = resolve_run_config(ROOT, {**demo.run_config(), "num-server-rounds": 2})
    recorder = RunRecorder(tmp_path, config)
    recorder(RoundReport(1, ArrayRecord(initial_adapter(config.model, 0))))
    assert ResumeState.read(tmp_path, config).round == 1
    _, other = resolve_run_config(ROOT, {**demo.run_config(), "num-server-rounds": 2, "model.lora.peft-lora-r": 4})
    _, shorter = resolve_run_config(ROOT, {**demo.run_config(), "num-server-rounds": 1})
    for what, folder, settings, message in [
        (
            "a resume with model.lora.peft-lora-r = 4 of a run trained with 8",
            tmp_path,
            other,
            r"that run used model.lora = .*; resume with the same settings",
        ),
        (
            "a resume with num-server-rounds = 1 of a run that completed round 1",
            tmp_path,
            shorter,
            "it completed 1 rounds, num-server-rounds = 1",
        ),
        ("a resume from a folder without resume.json", tmp_path / "elsewhere", config, "no resume.json there"),
    ]:
        with pytest.raises(ConfigError, match=message) as err:
            ResumeState.read(folder, settings)
        reliability.record("bad input", what, f"refused: {err.value}")


LONG_LIVED_SKIP = ("flwr-clientapp", "flwr-serverapp")  # one per message / per run: not long-lived


def _long_lived_rss(deployment) -> dict[str, int]:
    """RSS of every process that lives as long as the deployment, by name and pid."""
    rss = {}
    for pid in deployment.pids():
        root = psutil.Process(pid)
        for p in (root, *root.children(recursive=True)):
            try:
                cmdline = " ".join(p.cmdline())
                if not any(skip in cmdline for skip in LONG_LIVED_SKIP):
                    rss[f"{p.pid} {' '.join(p.cmdline()[:3])[-80:]}"] = p.memory_info().rss
            except psutil.NoSuchProcess:
                continue
    return rss


@pytest.mark.soak
@pytest.mark.parametrize("deployment", ["trainer"], indirect=True)
def test_soak_long_lived_processes_do_not_grow(deployment, demo, tmp_path, pytestconfig, reliability):
    """20 SuperNodes, a SuperLink and the trainer over many rounds: every long-lived
    process's RSS grows at most 10 % from the baseline round (5 in the full soak of 20
    rounds) to the last. CI runs the short form; `--soak-rounds 20` runs the full one."""
    rounds_wanted = pytestconfig.getoption("soak_rounds")
    baseline_round = min(5, rounds_wanted // 2)
    samples: dict[int, dict[str, int]] = {}

    def watch() -> None:
        deadline = time.monotonic() + 60 * rounds_wanted
        while time.monotonic() < deadline and baseline_round not in samples:
            lines = [p.read_text().count("\n") for p in tmp_path.glob("*-run*/metrics.jsonl")]
            if lines and lines[0] >= baseline_round:
                samples[baseline_round] = _long_lived_rss(deployment)
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    _, rounds = run(deployment, demo, tmp_path, timeout=60 * rounds_wanted, **{"num-server-rounds": rounds_wanted})
    watcher.join(10)
    last = _long_lived_rss(deployment)
    assert len(rounds) == rounds_wanted and baseline_round in samples
    before = samples[baseline_round]
    assert len(before) >= 22  # the SuperLink, 20 SuperNodes, the trainer supervisor (and what they keep)
    ratios = {name: last[name] / before[name] for name in before if name in last}
    worst = max(ratios, key=ratios.get)
    print(
        f"soak: {len(ratios)} long-lived processes, RSS round {baseline_round} -> {rounds_wanted}: "
        f"largest growth {ratios[worst]:.3f}x ({worst})"
    )
    grown = {name: (before[name], last[name]) for name in before if name in last and last[name] > 1.10 * before[name]}
    assert not grown, f"RSS grew more than 10 % from round {baseline_round} to {rounds_wanted}: {grown}"
    reliability.record(
        "fault",
        f"a soak: {rounds_wanted} rounds on {NODES} SuperNodes, a SuperLink and a warm trainer",
        f"{len(rounds)} of {rounds_wanted} rounds completed; {len(grown)} of {len(ratios)} long-lived processes "
        f"grew over 10 % in RSS from round {baseline_round} to {rounds_wanted}",
        rounds_lost=_rounds_lost(rounds_wanted, rounds),
    )


@pytest.mark.deployment
@pytest.mark.parametrize("deployment", ["trainer"], indirect=True)  # the ServerApp's concern
def test_a_run_outside_the_leaderboard_samples_its_own_fraction(deployment, demo, tmp_path):
    run_dir, rounds = run(
        deployment,
        demo,
        tmp_path,
        **{"num-server-rounds": 1, "leaderboard": False, "static.strategy.fraction-train": 0.15},
    )
    assert len(rounds[0]["clients"]) == 3  # int(0.15 * 20), where the leaderboard samples 2
    assert "leaderboard settings: **off**" in (run_dir / "summary.md").read_text()


@pytest.mark.deployment
@pytest.mark.parametrize("deployment", ["trainer"], indirect=True)
def test_an_unknown_key_sent_by_a_plain_flwr_run_is_named_in_the_superlink_log(deployment, tmp_path, reliability):
    """Flower checks the keys before the run exists and tells `flwr` only that the run
    configuration is invalid; its SuperLink's own log names the key."""
    with pytest.raises(DeployError, match=r"^flwr run failed: .*Invalid run configuration") as refused:
        deployment.cli.submit(ROOT, {"model.lora.rr": 8}, tmp_path)
    superlink_log = (deployment.workdir / "logs" / "superlink.log").read_text()
    line = next(line for line in superlink_log.splitlines() if "Could not start run" in line)
    assert "Key 'model.lora.rr' is not present" in line
    reliability.record(
        "bad input",
        "model.lora.rr = 8 (a typo) through a plain flwr run",
        f"refused before the run existed: flwr says {str(refused.value)[str(refused.value).index('[code') :]!r}; "
        f"the SuperLink log says: {line[line.index('Could not start run') :]}",
    )


@pytest.mark.deployment
@pytest.mark.parametrize("deployment", ["trainer"], indirect=True)  # the ServerApp's concern
def test_a_relative_results_dir_lands_in_the_app_folder(deployment, demo):
    """A plain `flwr run` sends results.dir as written; the ServerApp runs in the app folder."""
    relative = f"results/relative-test-{os.getpid()}"
    sent, _ = resolve_run_config(ROOT, {**demo.run_config(), "num-server-rounds": 1})
    try:
        run_id = deployment.cli.submit(ROOT, {**sent, "results.dir": relative}, deployment.workdir)
        status, details = deployment.cli.wait_finished(run_id, timeout=300)
        assert status == "finished:completed", details
        (run_dir,) = (ROOT / relative).glob("*-run*")
        assert (run_dir / "metrics.jsonl").is_file() and (run_dir / "round-1").is_dir()
    finally:
        shutil.rmtree(ROOT / relative, ignore_errors=True)


@pytest.mark.deployment
def test_a_run_in_which_every_client_fails_does_not_complete(deployment, demo, tmp_path, reliability):
    """4-bit on CPU nodes, sent past the deploy tool's own check as a plain `flwr run` would."""
    sent, _ = resolve_run_config(ROOT, {**demo.run_config(), "num-server-rounds": 1, "results.dir": str(tmp_path)})
    run_id = deployment.cli.submit(ROOT, {**sent, "model.quantization": 4}, deployment.workdir)
    status, details = deployment.cli.wait_finished(run_id, timeout=300)
    assert status != "finished:completed", details
    (run_dir,) = tmp_path.glob("*-run*")
    (line,) = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert line["clients"] == [] and len(line["failed"]) == 2
    # The ServerApp's log ends in the reason, in one line, not a traceback.
    shown = deployment.cli.log(run_id)
    assert "Traceback" not in shown, shown
    assert "ServerApp stopped: no round aggregated an update" in shown, shown
    reliability.record(
        "bad input",
        "model.quantization = 4 sent to CPU nodes past the deploy tool, "
        f"as a plain flwr run would ({_layout(deployment)})",
        f"run {status}; round 1: {len(line['clients'])} updates, {len(line['failed'])} failed; "
        f"the log says: {shown[shown.index('ServerApp stopped') :].splitlines()[0].replace(str(run_dir), '$RUN')}",
    )


@pytest.mark.deployment
def test_stopping_leaves_no_process(deployment, demo, tmp_path, reliability):
    """Stopped in the middle of a run (as Ctrl-C on `deploy run` does): every process group
    we started, with the SuperExec and trainer processes in it, and the ServerApp and
    ClientApps, which Flower's SuperExec starts in sessions of their own.

    Dead children that the container's init has not reaped yet (zombies) run nothing.
    """
    groups = set(deployment.pids())
    assert len(groups) == NODES + 1 + len(deployment.topology.trainers)
    members = [p for p in psutil.process_iter() if _pgid(p.pid) in groups]
    assert len(members) > len(groups), "the SuperLink and SuperNodes spawn SuperExec processes"
    sent, _ = resolve_run_config(ROOT, {**demo.run_config(), "results.dir": str(tmp_path), "num-server-rounds": 5})
    deployment.cli.submit(ROOT, sent, tmp_path)
    deadline = time.monotonic() + 120
    descendants = _descendants(groups)
    while not any("flwr-serverapp" in _cmdline(p) for p in descendants):
        assert time.monotonic() < deadline, "the ServerApp never started"
        time.sleep(0.2)
        descendants = _descendants(groups)
    assert any(_pgid(p.pid) not in groups for p in descendants), "the ServerApp runs outside our process groups"
    deployment.down()
    started = {p.pid for p in descendants}
    alive = [
        p
        for p in psutil.process_iter(["status"])
        if (_pgid(p.pid) in groups or p.pid in started) and p.info["status"] != psutil.STATUS_ZOMBIE
    ]
    assert alive == []
    reliability.record(
        "fault",
        f"the deployment stopped in the middle of a run, as Ctrl-C on deploy run does ({_layout(deployment)})",
        f"{len(alive)} processes left of the {len(groups)} process groups started and the ServerApp's own session",
    )


def _lasting_zombies(pids, seconds: float = 10) -> list[str]:
    """Zombies in these process trees that stay `seconds`: children nobody waits for. One
    that its parent is about to reap (a subprocess call returning) is gone by then."""
    deadline = time.monotonic() + seconds
    while (
        zombies := [p for p in _descendants(pids) if _status(p) == psutil.STATUS_ZOMBIE]
    ) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [
        f"{z.pid} under {_cmdline(psutil.Process(z.ppid()))!r}" for z in zombies if _status(z) == psutil.STATUS_ZOMBIE
    ]


def _status(process: psutil.Process) -> str | None:
    try:
        return process.status()
    except psutil.NoSuchProcess:
        return None


def _cmdline(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:  # gone, or a zombie
        return ""


def _descendants(pids) -> list[psutil.Process]:
    found = []
    for pid in pids:
        try:
            found += psutil.Process(pid).children(recursive=True)
        except psutil.NoSuchProcess:
            continue
    return [p for p in found if p.is_running()]


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None
