"""SuperNodes started by hand, as a site outside the deploy tool would start them, on a real
local deployment: one with its own copy of the data, one with a partition id out of range.

The federation is two partitions, every online node sampled each round (leaderboard=false).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from deploy.backends.process import ProcessDeployment, free_port
from deploy.project import resolve_run_config
from deploy.topology import SUPERNODE_ENV, Host, plan
from tests.conftest import ROOT

FEDERATION = {
    "leaderboard": False,
    "static.dataset.num-partitions": 2,
    "static.strategy.fraction-train": 1.0,
}


@pytest.fixture()
def deployment(demo, tmp_path):
    """The deploy tool's own two nodes, one per partition."""
    topology = plan(2, [Host("localhost")], superlink_port=free_port(), nodes_per_round=2, trainers=0)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    sent, _ = resolve_run_config(ROOT, {**demo.run_config(), **FEDERATION})
    with ProcessDeployment(topology, tmp_path / "deploy", env, app_dir=ROOT, run_config=sent) as started:
        yield started


def start_supernode(deployment: ProcessDeployment, home: Path, node_config: str) -> subprocess.Popen:
    home.mkdir(parents=True)
    return subprocess.Popen(
        [
            str(deployment.bin_dir / "flower-supernode"),
            "--insecure",
            "--superlink", deployment.connection.address,
            "--node-config", node_config,
            "--port", str(free_port()),
        ],
        env={**deployment.env, **SUPERNODE_ENV, "FLWR_HOME": str(home)},
        stdout=(home / "log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def test_a_node_reads_its_own_data_and_a_misconfigured_node_is_left_out(deployment, demo, tmp_path, reliability):
    """Round 1 samples all four nodes: the one with partition-id 20 fails, naming its node
    config, and is never sampled again; round 2 trains the three good nodes only.

    The hand-started node of partition 1 has its own copy of the data, holding every row
    twice, so its partition has twice the rows of the deploy tool's nodes, which read the
    run config's file: that is how the round shows which file each node read.
    """
    rows = json.loads(demo.data_file.read_text())
    own_copy = tmp_path / "site-b-data.json"
    own_copy.write_text(json.dumps(rows + rows))
    hand_started = [
        start_supernode(deployment, tmp_path / "site-b", f'partition-id=1 num-partitions=2 data-files="{own_copy}"'),
        start_supernode(deployment, tmp_path / "typo", "partition-id=20 num-partitions=2"),
    ]
    try:
        deployment.cli.wait_for_nodes(4, timeout=120, alive=deployment.check_alive)
        results = tmp_path / "results"
        sent, _ = resolve_run_config(
            ROOT, {**demo.run_config(), **FEDERATION, "num-server-rounds": 2, "results.dir": str(results)}
        )
        run_id = deployment.cli.submit(ROOT, sent, tmp_path)
        status, details = deployment.cli.wait_finished(run_id, timeout=300)
        assert status == "finished:completed", details
        (run_dir,) = results.glob("*-run*")
        first, second = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    finally:
        for process in hand_started:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    (failed,) = first["failed"]
    assert "NodeConfigError" in failed["reason"] and "partition-id = 20: must be an integer in [0, 1]" in failed["reason"]
    examples = sorted((c["partition-id"], c["num-examples"]) for c in first["clients"])
    assert examples == [(0, len(rows) // 2), (1, len(rows) // 2), (1, len(rows))]
    assert second["failed"] == [] and len(second["clients"]) == 3
    assert failed["node-id"] not in {c["node-id"] for c in second["clients"]}
    assert "is left out of sampling from now on" in deployment.cli.log(run_id)
    reliability.record(
        "bad input", "a SuperNode started by hand with node config partition-id=20 (of 2)",
        f"failed in round 1 only ({failed['reason']}), then left out of sampling; "
        f"both rounds completed, round 2 with the {len(second['clients'])} good nodes",
    )
