"""Measures the Docker stack on this host: `deploy up` to nodes online, to the first
round's checkpointed metrics, and idle memory per SuperNode container with 20 on one host.

    python bench/docker_stack/docker_stack.py --json bench/docker_stack/docker_stack.json

Needs the images (`deploy up` builds them if missing) and runs the tiny demo model on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import docker

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from deploy.demo import build_demo  # noqa: E402
from deploy.flwr_cli import FlwrCli  # noqa: E402


def deploy(*args: str, env: dict) -> None:
    subprocess.run([sys.executable, "-m", "deploy", "--app", str(ROOT), *args], env=env, check=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", type=Path)
    parser.add_argument("--settle", type=float, default=30, help="seconds idle before reading memory")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="stack-bench-"))
    demo = build_demo(work / "demo")
    env = {**os.environ, "FLWR_HOME": str(work / "flwr-home")}
    layout = ["--gpus", "", "--dir", str(work), "--volume", f"{work / 'demo'}:/demo:ro"]
    start = time.monotonic()
    deploy(
        "up",
        *layout,
        "--no-submit",
        "--model",
        "/demo/tiny-gemma2",
        "--base-image",
        "flowertune-base:bookworm",
        env=env,
    )
    up_seconds = time.monotonic() - start
    try:
        time.sleep(args.settle)  # idle means idle: nothing to wait for but time
        client = docker.from_env()
        memory = {}
        for c in client.containers.list(filters={"label": "flowertune-deploy.project=flowertune"}):
            stats = c.stats(stream=False)
            usage = stats["memory_stats"]["usage"] - stats["memory_stats"].get("stats", {}).get("inactive_file", 0)
            memory[c.name] = usage / 2**20
        nodes = [v for k, v in memory.items() if "supernode" in k]
        cli = FlwrCli(Path(sys.executable).parent / "flwr", work / "flwr-home", "remote-deployment", env)
        overrides = {
            **demo.run_config(),
            "model.name": "/demo/tiny-gemma2",
            "dataset.data-files": "/demo/alpaca.json",
            "num-server-rounds": 1,
        }
        submitted = time.monotonic()
        run_id = cli.submit(ROOT, overrides, work)
        metrics = None
        while metrics is None and time.monotonic() - submitted < 600:
            metrics = next((work / "results").glob("*-run*/metrics.jsonl"), None)
            time.sleep(1)
        first_round = time.monotonic() - submitted
        status = cli.wait_finished(run_id, timeout=120)
    finally:
        deploy("down", *layout, env=env)
    result = {
        "deploy_up_to_20_nodes_online_s": round(up_seconds, 1),
        "submit_to_first_round_recorded_s": round(first_round, 1),
        "deploy_up_to_first_round_s": round(up_seconds + args.settle + first_round, 1) - args.settle,
        "run_status": status[0],
        "idle_mib_per_supernode": {
            "mean": round(statistics.mean(nodes), 1),
            "max": round(max(nodes), 1),
            "min": round(min(nodes), 1),
            "count": len(nodes),
        },
        "idle_mib": {k: round(v, 1) for k, v in sorted(memory.items()) if "supernode" not in k},
        "note": "memory = cgroup usage minus inactive file cache, after the stack idled --settle seconds",
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
