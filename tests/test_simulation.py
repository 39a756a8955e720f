"""The same app in Flower's Simulation Engine: `deploy simulation` registers the connection,
`flwr run . local-simulation` runs 2 rounds of the tiny model on the CPU, unchanged.

`flwr` starts its local SuperLink detached, on fixed ports unless told otherwise, and leaves it
running after the run: the test gives it free ports and its own FLWR_HOME, and stops it after.
The runtime dependency installation is off: CI has no network, and the venv has everything.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.flwr_cli import FlwrCli, local_superlink_env, stop_local_superlink, write_run_config
from tests.conftest import ROOT, assert_adapter_trained

pytestmark = pytest.mark.deployment

CONNECTION = "local-simulation"
# flwr gives its local SuperLink 15 s to start; on a loaded 2-core machine that start can take longer.
STARTUP_FAILED = "Failed to start local SuperLink"


@pytest.mark.timeout(900)
def test_two_rounds_in_the_simulation_engine(demo, tmp_path):
    flwr_home = tmp_path / "flwr-home"
    bin_dir = Path(sys.executable).parent
    env = {
        **local_superlink_env(os.environ, flwr_home, bin_dir),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    registered = subprocess.run(
        [sys.executable, "-m", "deploy", "--app", str(ROOT), "simulation", "--gpus", ""],
        env=env,
        capture_output=True,
        text=True,
    )
    assert registered.returncode == 0, registered.stderr
    results = tmp_path / "results"
    overrides = write_run_config(
        tmp_path / "run-config.toml", {**demo.run_config(), "num-server-rounds": 2, "results.dir": str(results)}
    )
    command = [str(bin_dir / "flwr"), "run", ".", CONNECTION, "--run-config", str(overrides), "--stream"]
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=780)
        if STARTUP_FAILED in done.stdout + done.stderr:
            stop_local_superlink(flwr_home)
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=780)
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-3000:]
        # `flwr run` exits 0 for a run that failed: the run's own status says how it ended.
        run_id = re.search(r"Successfully started run (\d+)", output).group(1)
        status, details = FlwrCli(bin_dir / "flwr", flwr_home, CONNECTION, env).wait_finished(run_id, timeout=60)
    finally:
        stop_local_superlink(flwr_home)
    assert status == "finished:completed", f"{details}\n{output[-3000:]}"
    assert "(20 simulated SuperNodes)" in output
    assert "training in this ClientApp process" in output
    (run_dir,) = results.glob("*-run*")
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert len(r["clients"]) == 2 and r["rejected"] == [] and r["failed"] == []
        assert {c["partition-id"] for c in r["clients"]} <= set(range(20))
        assert r["aggregate"]["train-loss"] > 0
    assert_adapter_trained(demo, run_dir, final_round=2)
