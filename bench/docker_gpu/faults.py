"""Faults in a plain `docker compose up` of a CDI-rendered stack on the GPU machine.

While the compose job runs (its `submit` service submits the run and streams it), this
crashes the GPU's trainer container once round 1 is saved, and a SuperNode container caught
training (a `flwr-clientapp` among its processes) once round 2 is saved. Each crash kills
the container's init process from the host, as a crash or the OOM killer would: `docker
kill` counts as a stop, which the restart policy obeys. Then it waits for `submit` to exit
and writes what happened as JSON.

    python bench/docker_gpu/faults.py --results DIR/results --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import docker

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from app.report import read_rounds, round_rows  # noqa: E402

PROJECT = "flowertune"


def rounds_saved(results: Path) -> list[dict]:
    runs = sorted(results.glob("*-run*"))
    return read_rounds(runs[-1]) if runs and (runs[-1] / "metrics.jsonl").is_file() else []


def wait_for_round(results: Path, n: int, deadline: float) -> None:
    while len(rounds_saved(results)) < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"round {n} not saved in time")
        time.sleep(1)


def crash(container) -> float:
    container.reload()
    os.kill(container.attrs["State"]["Pid"], signal.SIGKILL)
    return time.time()


def training_supernode(client: docker.DockerClient, deadline: float):
    while time.monotonic() < deadline:
        for c in client.containers.list(filters={"name": f"{PROJECT}-supernode-"}):
            if any("flwr-clientapp" in " ".join(p) for p in c.top()["Processes"]):
                return c
        time.sleep(0.5)
    raise SystemExit("no SuperNode was seen training")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, required=True)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--timeout", type=float, default=480)
    args = ap.parse_args()
    client = docker.from_env()
    deadline = time.monotonic() + args.timeout
    events = []
    wait_for_round(args.results, 1, deadline)
    trainer = client.containers.get(f"{PROJECT}-trainer-gpu0-1")
    events.append({"crashed": trainer.name, "after-round": 1, "at": crash(trainer)})
    print(f"round 1 saved; crashed {trainer.name}", flush=True)
    wait_for_round(args.results, 2, deadline)
    node = training_supernode(client, deadline)
    events.append({"crashed": node.name, "after-round": 2, "at": crash(node)})
    print(f"round 2 saved; crashed {node.name} while it trained", flush=True)
    submit = client.containers.get(f"{PROJECT}-submit-1")
    while submit.status != "exited" and time.monotonic() < deadline:
        time.sleep(2)
        submit.reload()
    for event in events:
        c = client.containers.get(event["crashed"])
        event.update(restarts=c.attrs["RestartCount"], status=c.status)
    rows = round_rows(rounds_saved(args.results))
    result = {
        "submit-exit-code": submit.attrs["State"]["ExitCode"] if submit.status == "exited" else None,
        "submit-log-tail": submit.logs(tail=5).decode(errors="replace").splitlines(),
        "events": events,
        "rounds": [{k: r[k] for k in ("round", "seconds", "training", "failed")} for r in rows],
    }
    args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
