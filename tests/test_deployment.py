"""A real local deployment: one SuperLink and 20 SuperNodes as processes, on the CPU.

Both aggregations run on the same deployment, three rounds each, through `flwr run`.
"""

from __future__ import annotations

import json
import os

import psutil
import pytest

from deploy.backends.process import ProcessDeployment, free_port
from deploy.project import resolve_run_config
from deploy.topology import Host, plan
from tests.conftest import ROOT, assert_adapter_trained

NODES = 20


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    topology = plan(NODES, [Host("localhost")], superlink_port=free_port())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with ProcessDeployment(topology, tmp_path_factory.mktemp("deploy"), env) as started:
        yield started


@pytest.mark.parametrize("use_flexlora", [0, 1], ids=["fedavg", "flexlora"])
def test_three_rounds(deployment, demo, tmp_path, use_flexlora):
    overrides = {
        **demo.run_config(),
        "num-server-rounds": 3,
        "strategy.use-flexlora": use_flexlora,
        "train.save-every-round": 2,
        "results.dir": str(tmp_path),
    }
    sent, _ = resolve_run_config(ROOT, overrides)
    run_id = deployment.cli.submit(ROOT, sent, tmp_path)
    deployment.cli.stream_logs(run_id)
    status, details = deployment.cli.wait_finished(run_id, timeout=60)
    assert status == "finished:completed", details

    (run_dir,) = tmp_path.glob("*-run*")
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
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
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl", "round-0", "round-2", "round-3"]

    assert_adapter_trained(demo, run_dir, final_round=3)


def test_stopping_leaves_no_process(deployment):
    """Every process group we started, with the SuperExec and ClientApps Flower spawned in it.

    Dead children that the container's init has not reaped yet (zombies) run nothing.
    """
    groups = set(deployment.pids())
    assert len(groups) == NODES + 1
    members = [p for p in psutil.process_iter() if _pgid(p.pid) in groups]
    assert len(members) > len(groups), "the SuperLink and SuperNodes spawn SuperExec processes"
    deployment.down()
    alive = [p for p in psutil.process_iter(["status"]) if _pgid(p.pid) in groups and p.info["status"] != psutil.STATUS_ZOMBIE]
    assert alive == []


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None
