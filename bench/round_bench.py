"""Seconds per round of our deployment, with their breakdown, for the side-by-side benchmark.

Starts the topology `deploy run` would (`ProcessDeployment`: a SuperLink, 20 SuperNodes
and, unless --trainers-per-gpu 0, the warm trainers of each GPU), then submits one run
per --runs entry on that same deployment with `flwr run`, waits for each, and reads its
metrics.jsonl. GPU memory is sampled from nvidia-smi every second, per GPU and per process.

Per round: `seconds` (between metrics lines; round 1 counts from the ServerApp's start),
`training` (the slowest client's train-seconds), `client-start` (that client's time in
the ClientApp handler outside training: queueing for a trainer, data, model load, adapter
in and out), `aggregation` (FedAvg/FlexLoRA plus any checkpoint) and `exchange` (the rest:
Flower's polling, ClientApp process start and imports, message transfer).

    python bench/round_bench.py --label warm-1gpu --gpus 0 --model DIR --data FILE --runs fedavg,flexlora --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import threading
import time
from pathlib import Path

from deploy.backends.process import ProcessDeployment, free_port
from deploy.project import resolve_run_config
from deploy.topology import Host, parse_gpus, plan

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


class GpuSampler:
    """Peak memory per GPU and per process (MiB), from nvidia-smi once a second."""

    def __init__(self) -> None:
        self.gpus: dict[str, int] = {}
        self.processes: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "GpuSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            for query, into in (
                (["--query-gpu=index,memory.used"], self.gpus),
                (["--query-compute-apps=pid,used_memory"], self.processes),
            ):
                try:
                    text = subprocess.run(
                        ["nvidia-smi", *query, "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10
                    ).stdout
                except (OSError, subprocess.TimeoutExpired):
                    return
                for line in text.strip().splitlines():
                    key, _, mib = line.partition(",")
                    if mib.strip().isdigit():
                        into[key.strip()] = max(into.get(key.strip(), 0), int(mib))


def round_rows(metrics: list[dict]) -> list[dict]:
    rows, previous = [], 0.0
    for r in metrics:
        seconds = r["elapsed-seconds"] - previous
        previous = r["elapsed-seconds"]
        clients = r["clients"]
        slowest = max(clients, key=lambda c: c["client-seconds"]) if clients else None
        aggregation = r["aggregate-seconds"] + r["checkpoint-seconds"]
        training = max((c["train-seconds"] for c in clients), default=0.0)
        client = slowest["client-seconds"] if slowest else 0.0
        rows.append(
            {
                "round": r["round"],
                "seconds": round(seconds, 2),
                "training": round(training, 2),
                "client-start": round(client - slowest["train-seconds"], 2) if slowest else None,
                "aggregation": round(aggregation, 3),
                "exchange": round(seconds - client - aggregation, 2),
                "failed": len(r["failed"]),
                "clients": [
                    {
                        "partition-id": c["partition-id"],
                        "train-seconds": round(c["train-seconds"], 2),
                        "prepare-seconds": round(c["prepare-seconds"], 2),
                        "queue-seconds": round(c.get("queue-seconds", 0.0), 2),
                        "tokens-per-second": round(c["train-tokens"] / c["train-seconds"], 1),
                        "peak-allocated-gib": round(c["peak-gpu-bytes"] / GIB, 2),
                        "train-loss": round(c["train-loss"], 4),
                        "trainer-pid": c.get("trainer-pid"),
                        "trainer-overflow": c.get("trainer-overflow"),
                    }
                    for c in clients
                ],
            }
        )
    return rows


def summary(rows: list[dict], startup: float) -> dict:
    """Round 1 is the warm-up; the 10-round job is extrapolated from the median of the rest."""
    measured = rows[1:]
    median = statistics.median(r["seconds"] for r in measured)
    non_training = statistics.median((r["seconds"] - r["training"]) / r["seconds"] for r in measured)
    return {
        "median-round-seconds": round(median, 2),
        "median-training-seconds": round(statistics.median(r["training"] for r in measured), 2),
        "median-non-training-share": round(non_training, 3),
        "queued-clients": sum(1 for r in measured for c in r["clients"] if c["queue-seconds"] > 0.5),
        "overflow-clients": sum(1 for r in measured for c in r["clients"] if c["trainer-overflow"]),
        "extrapolated-10-round-job-seconds": round(startup + rows[0]["seconds"] + 9 * median, 1),
        "extrapolation": "deployment start-up + round 1 + 9 x median of rounds 2..N (extrapolated, not measured)",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", required=True)
    ap.add_argument("--gpus", required=True)
    ap.add_argument("--trainers-per-gpu", type=int, help="0: train inside each ClientApp (default: the layout's)")
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--runs", default="fedavg", help="comma-separated: fedavg, flexlora")
    ap.add_argument("--rounds", type=int, default=4, help="per run; the first is the warm-up")
    ap.add_argument("--run-config", default="", help="extra overrides, 'key=value ...'")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/round-bench"))
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()

    from flwr.common.config import parse_config_args

    base = {"model.name": args.model, "dataset.data-files": args.data, "num-server-rounds": args.rounds}
    base.update(parse_config_args([args.run_config]) if args.run_config else {})
    sent, config = resolve_run_config(ROOT, base)
    nodes = config.dataset.num_partitions
    topology = plan(
        nodes, [Host("localhost", parse_gpus(args.gpus))], superlink_port=free_port(),
        nodes_per_round=config.strategy.nodes_per_round(nodes), trainers=args.trainers_per_gpu,
    )
    result: dict = {"label": args.label, "gpus": args.gpus, "layout": topology.table().splitlines()[:3], "runs": {}}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with GpuSampler() as sampler:
        start = time.monotonic()
        with ProcessDeployment(topology, args.workdir / args.label, env, app_dir=ROOT, run_config=sent) as deployment:
            result["startup-seconds"] = round(time.monotonic() - start, 1)
            print(f"[{args.label}] deployment up in {result['startup-seconds']} s", flush=True)
            for name in args.runs.split(","):
                results = args.workdir / args.label / f"results-{name}"
                overrides = {**sent, "strategy.use-flexlora": int(name == "flexlora"), "results.dir": str(results)}
                run_id = deployment.cli.submit(ROOT, overrides, args.workdir / args.label)
                status, details = deployment.cli.wait_finished(run_id, timeout=3600)
                if status != "finished:completed":
                    raise SystemExit(f"[{args.label} {name}] run {run_id}: {status} {details}")
                (run_dir,) = results.glob("*-run*")
                metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
                rows = round_rows(metrics)
                result["runs"][name] = {"status": status, "rounds": rows, **summary(rows, result["startup-seconds"])}
                for r in rows:
                    print(
                        f"[{args.label} {name}] round {r['round']}: {r['seconds']} s = training {r['training']} + "
                        f"client start {r['client-start']} + aggregation {r['aggregation']} + exchange {r['exchange']}",
                        flush=True,
                    )
                print(f"[{args.label} {name}] {status} {details}; median {result['runs'][name]['median-round-seconds']} s", flush=True)
                args.json.write_text(json.dumps(result, indent=1))
    result["peak-gpu-mib"] = sampler.gpus
    result["peak-process-mib"] = sampler.processes
    args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
