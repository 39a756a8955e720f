"""SuperNodes started by hand, as a site outside the deploy tool would start them, on a real
local deployment: one with its own copy of the data, one with a partition id out of range,
one repeating a partition that a deploy-tool node trains.

The federation is three partitions, every online node sampled each round (leaderboard=false).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from deploy.backends.process import ProcessDeployment, free_port
from deploy.project import resolve_run_config
from deploy.topology import SUPERNODE_ENV, Host, plan
from tests.conftest import ROOT

pytestmark = pytest.mark.deployment

PARTITIONS = 3
FEDERATION = {
    "leaderboard": False,
    "static.dataset.num-partitions": PARTITIONS,
    "static.strategy.fraction-train": 1.0,
}


@pytest.fixture()
def deployment(demo, tmp_path):
    """The deploy tool's nodes for partitions 0 and 1; partition 2 is a site's own."""
    topology = plan(PARTITIONS, [Host("localhost")], superlink_port=free_port(), nodes_per_round=PARTITIONS, trainers=0)
    topology = replace(topology, nodes=topology.nodes[:2])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    sent, _ = resolve_run_config(ROOT, {**demo.run_config(), **FEDERATION})
    with ProcessDeployment(topology, tmp_path / "deploy", env, app_dir=ROOT, run_config=sent) as started:
        yield started


def shard(rows: int, index: int) -> int:
    """Rows in partition `index` of `rows` rows: Flower Datasets' IID split, the first ones one longer."""
    return rows // PARTITIONS + (index < rows % PARTITIONS)


def start_supernode(deployment: ProcessDeployment, home: Path, node_config: str) -> subprocess.Popen:
    home.mkdir(parents=True)
    return subprocess.Popen(
        [
            str(deployment.bin_dir / "flower-supernode"),
            "--insecure",
            "--superlink",
            deployment.connection.address,
            "--node-config",
            node_config,
            "--port",
            str(free_port()),
        ],
        env={**deployment.env, **SUPERNODE_ENV, "FLWR_HOME": str(home)},
        stdout=(home / "log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def test_hand_started_nodes_own_data_a_bad_partition_id_and_a_repeated_one(deployment, demo, tmp_path, reliability):
    """Round 1 samples all five nodes. The one with partition-id 20 fails, naming its node
    config, and is never sampled again. Of the two nodes on partition 1, the one with the
    higher node id is refused as a repeat and held back. Round 2 trains each partition once.

    The hand-started node of partition 2 has its own copy of the data, holding every row
    twice, so its partition has twice the rows that the run config's file would give it:
    that is how the round shows which file the node read.
    """
    rows = json.loads(demo.data_file.read_text())
    own_copy = tmp_path / "site-b-data.json"
    own_copy.write_text(json.dumps(rows + rows))
    hand_started = [
        start_supernode(
            deployment, tmp_path / "site-b", f'partition-id=2 num-partitions={PARTITIONS} data-files="{own_copy}"'
        ),
        start_supernode(deployment, tmp_path / "typo", f"partition-id=20 num-partitions={PARTITIONS}"),
        start_supernode(deployment, tmp_path / "repeat", f"partition-id=1 num-partitions={PARTITIONS}"),
    ]
    try:
        deployment.cli.wait_for_nodes(5, timeout=120, alive=deployment.check_alive)
        results = tmp_path / "results"
        sent, _ = resolve_run_config(
            ROOT, {**demo.run_config(), **FEDERATION, "num-server-rounds": 2, "results.dir": str(results)}
        )
        run_id = deployment.cli.submit(ROOT, sent, tmp_path)
        status, details = deployment.cli.wait_finished(run_id, timeout=300)
        assert status == "finished:completed", details
        (run_dir,) = results.glob("*-run*")
        first, second = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        log = deployment.cli.log(run_id)
    finally:
        for process in hand_started:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    (failed,) = first["failed"]
    assert (
        "NodeConfigError" in failed["reason"] and "partition-id = 20: must be an integer in [0, 2]" in failed["reason"]
    )
    (repeat,) = first["rejected"]
    (owner,) = [c["node-id"] for c in first["clients"] if c["partition-id"] == 1]
    assert repeat["partition-id"] == 1 and repeat["node-id"] > owner
    assert repeat["reason"] == f"partition-id 1 is node {owner}'s, which is online: a repeated node config partition-id"
    examples = sorted((c["partition-id"], c["num-examples"]) for c in first["clients"])
    assert examples == [(0, shard(len(rows), 0)), (1, shard(len(rows), 1)), (2, shard(2 * len(rows), 2))]
    assert second["failed"] == [] and second["rejected"] == []
    assert sorted(c["partition-id"] for c in second["clients"]) == [0, 1, 2]
    assert not {failed["node-id"], repeat["node-id"]} & {c["node-id"] for c in second["clients"]}
    assert "is left out of sampling from now on" in log
    assert f"Node {repeat['node-id']} repeats partition 1 of node {owner}: held back from sampling" in log
    reliability.record(
        "bad input",
        f"a SuperNode started by hand with node config partition-id=20 (of {PARTITIONS})",
        f"failed in round 1 only ({failed['reason']}), then left out of sampling; "
        f"both rounds completed, round 2 with the {len(second['clients'])} good nodes",
    )
    reliability.record(
        "bad input",
        "a SuperNode started by hand with node config partition-id=1, which a deployed node trains",
        f"round 1 refused the later node's update ({repeat['reason'].replace(str(owner), 'N')}) "
        "and aggregated partition 1 once; "
        "round 2 did not sample it",
    )
