"""The run report from real run folders: summaries, byte totals, valid PNG plots, `deploy report`."""

import json
import subprocess
import sys

import pytest
from flwr.app import ArrayRecord
from PIL import Image

from app.checkpoint import RunRecorder
from app.config import AppConfig
from app.models import initial_adapter
from app.report import progress_line, summarize
from app.strategy import RoundReport
from tests.conftest import ROOT

pytestmark = pytest.mark.unit

DOWN, UP = 1_000_000, 999_000


def record_run(run_config, folder, flexlora: bool, losses: list[float], failed: list[dict] | None = None):
    config = AppConfig.from_run_config(
        {**run_config, "num-server-rounds": len(losses), "strategy.use-flexlora": int(flexlora)}
    )
    recorder = RunRecorder(folder, config)
    state = initial_adapter(config.model, seed=1)
    for r, loss in enumerate(losses, start=1):
        clients = [
            {
                "node-id": 100 + p,
                "partition-id": p,
                "gpu": p % 2,
                "num-examples": 5,
                "train-loss": loss + p / 100,
                "train-seconds": 1.5,
                "train-tokens": 40,
                "bytes-to-client": DOWN,
                "bytes-from-client": UP,
                "rows-without-label": p % 2,
            }
            for p in (r, r + 7)
        ]
        lost = (failed or []) if r == 2 else []
        recorder(
            RoundReport(
                server_round=r, arrays=ArrayRecord(state), clients=clients, aggregate={"train-loss": loss}, failed=lost
            )
        )
    return folder


def assert_png(path):
    with Image.open(path) as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] > 200


def test_summary_counts_rounds_time_and_bytes(run_config, tmp_path):
    run = record_run(run_config, tmp_path / "fedavg", False, [2.0, 1.5, 1.2])
    summary = json.loads((run / "summary.json").read_text())
    assert summary == summarize(run)
    assert (summary["rounds-completed"], summary["rounds-planned"], summary["final-loss"]) == (3, 3, 1.2)
    assert summary["bytes"]["to-clients"] == 6 * DOWN and summary["bytes"]["from-clients"] == 6 * UP
    assert summary["bytes"]["share-of-budget"] == pytest.approx(6 * (DOWN + UP) / 200e9)
    assert [r["training"] for r in summary["rounds"]] == [1.5, 1.5, 1.5]
    assert summary["settings"]["model"]["lora"]["r"] == 8
    markdown = (run / "summary.md").read_text()
    assert "| 3 |" in markdown and "of the FlowerTune budget of 200.0 GB" in markdown
    assert summary["rows-without-label"] == {"1": 1, "9": 1, "3": 1}
    assert (
        "- rows with nothing to learn, left out of training: partition 1: 1, partition 9: 1, partition 3: 1\n"
        in markdown
    )
    assert_png(run / "loss.png")
    assert_png(run / "round_time.png")
    line = progress_line(summary)
    assert line.startswith("round 3/3: partition 3 on GPU 1: loss 1.2300") and "ETA 0 s" in line
    assert "2.0 MB sent, 2.0 MB received" in line


def test_the_summary_names_each_node_that_failed_a_round(run_config, tmp_path):
    """A host lost mid-run: its nodes fail by name, one never heard from with no known partition."""
    reason = "Error: Node Unavailable — The destination node failed to report a heartbeat within 2 × its interval."
    lost = [
        {"node-id": 41, "partition-id": 3, "reason": reason},
        {"node-id": 42, "partition-id": None, "reason": reason},
    ]
    run = record_run(run_config, tmp_path / "lost", False, [2.0, 1.5, 1.2], failed=lost)
    assert summarize(run)["nodes-failed"] == [{"round": 2, **f} for f in lost]
    assert (
        "- nodes that failed, left out of their round: round 2: node 41 (partition 3, Node Unavailable); "
        "round 2: node 42 (partition ?, Node Unavailable)\n" in (run / "summary.md").read_text()
    )


def test_deploy_report_redraws_and_compares_runs(run_config, tmp_path):
    fedavg = record_run(run_config, tmp_path / "fedavg", False, [2.0, 1.5])
    flex = record_run(run_config, tmp_path / "flexlora", True, [2.0, 1.4])
    for run in (fedavg, flex):
        (run / "loss.png").unlink()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "deploy",
            "--app",
            str(ROOT),
            "report",
            str(fedavg),
            str(flex),
            "--out",
            str(tmp_path / "cmp"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    for path in (
        fedavg / "loss.png",
        flex / "loss.png",
        tmp_path / "cmp" / "loss.png",
        tmp_path / "cmp" / "round_time.png",
    ):
        assert_png(path)
    bad = subprocess.run(
        [sys.executable, "-m", "deploy", "--app", str(ROOT), "report", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and bad.stderr == f"error: {tmp_path}: not a run folder (no metrics.jsonl in it)\n"
