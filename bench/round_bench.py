r"""Seconds per round of our deployment, with their breakdown, for the side-by-side benchmark.

Starts the topology `deploy run` would (`ProcessDeployment`: a SuperLink, 20 SuperNodes
and, unless --trainers-per-gpu 0, the warm trainers of each GPU), then submits one run
per --runs entry on that same deployment with `flwr run`, waits for each, and reads its
metrics.jsonl. GPU memory is sampled from nvidia-smi every second, per GPU and per process.
As under `deploy run`, the first run is submitted once the SuperNodes are online, while the
trainers may still load the model: `startup-seconds` ends there, the first run's round 1
holds the rest of the load, and `startup-timeline` says when the run was submitted and
when the trainers were ready.

Per round: `seconds` (between metrics lines; round 1 counts from the ServerApp's start),
`training` (the slowest client's train-seconds), `client-start` (that client's time in
the ClientApp handler outside training: queueing for a trainer, data, model load, adapter
in and out), `aggregation` (FedAvg/FlexLoRA plus any checkpoint) and `exchange` (the rest:
Flower's polling, ClientApp process start and imports, message transfer).

    python bench/round_bench.py --label warm-1gpu --gpus 0 --model DIR --data FILE --runs fedavg,flexlora \
        --json OUT.json
    python bench/round_bench.py --label scale-4gpu --gpus 0,1,2,3 --fit-trainers --runs fedavg,fedavg@0.5 ...

`--backend simulation` runs the same app in Flower's Simulation Engine instead, the seed's
way: `deploy simulation` registers `local-simulation` (20 virtual SuperNodes, 2 CPUs and
1 GPU per ClientApp, Ray limited to --gpus) in the run's own FLWR_HOME, and each run goes
through `flwr run . local-simulation`, which starts the local SuperLink (docs/simulation.md).

`--backend docker` starts the same topology as containers (`deploy up --no-submit`, images
built beforehand) and submits through the `remote-deployment` connection it registers, as
a user does; the model and data folders are mounted read-only at /model and /data.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from app.report import read_rounds
from app.report import round_rows as report_rows
from deploy.backends.process import ProcessDeployment, free_port
from deploy.flwr_cli import FlwrCli, local_superlink_env, stop_local_superlink
from deploy.project import resolve_run_config
from deploy.timeline import Timeline
from deploy.topology import Host, parse_gpus, plan, trainers_per_gpu

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
JOB_ROUNDS = 10  # the leaderboard's num-server-rounds: a whole job


class GpuSampler:
    """Peak memory per GPU and per process (MiB), from nvidia-smi once a second."""

    def __init__(self) -> None:
        self.gpus: dict[str, int] = {}
        self.processes: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> GpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def take(self, gpus: list[int]) -> dict[str, int]:
        """Peaks of `gpus` since the last take, and start again: one figure per run."""
        peaks = {k: v for k, v in self.gpus.items() if int(k) in gpus}
        self.gpus.clear()
        return peaks

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            for query, into in (
                (["--query-gpu=index,memory.used"], self.gpus),
                (["--query-compute-apps=pid,used_memory"], self.processes),
            ):
                try:
                    text = subprocess.run(
                        ["nvidia-smi", *query, "--format=csv,noheader,nounits"],
                        capture_output=True,
                        text=True,
                        timeout=10,
                    ).stdout
                except (OSError, subprocess.TimeoutExpired):
                    return
                for line in text.strip().splitlines():
                    key, _, mib = line.partition(",")
                    if mib.strip().isdigit():
                        into[key.strip()] = max(into.get(key.strip(), 0), int(mib))


def round_rows(metrics: list[dict]) -> list[dict]:
    """The run report's rows (`app.report.round_rows`), with the slowest client's time
    split into client start (queueing for a trainer, handshake, adapter in and out) and
    exchange (everything outside the ClientApp handler)."""
    rows = []
    for row in report_rows(metrics):
        clients = row["clients"]
        slowest = max(clients, key=lambda c: c["client-seconds"]) if clients else None
        client = slowest["client-seconds"] if slowest else 0.0
        rows.append(
            {
                **{k: row[k] for k in ("round", "seconds", "training", "aggregation", "failed")},
                "client-start": round(client - slowest["seconds"], 2) if slowest else None,
                "exchange": round(row["seconds"] - client - row["aggregation"], 2),
                "clients": [
                    {
                        "partition-id": c["partition-id"],
                        "gpu": c["gpu"],
                        "train-seconds": c["seconds"],
                        "queue-seconds": c["queue-seconds"],
                        "tokens-per-second": round(c["tokens"] / c["seconds"], 1),
                        "peak-allocated-gib": round(c["peak-gpu-bytes"] / GIB, 2),
                        "train-loss": round(c["loss"], 4),
                        "trainer-overflow": c["trainer-overflow"],
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
        "clients-measured": sum(len(r["clients"]) for r in measured),
        "queued-clients": sum(1 for r in measured for c in r["clients"] if c["queue-seconds"] > 0.5),
        "overflow-clients": sum(1 for r in measured for c in r["clients"] if c["trainer-overflow"]),
        "extrapolated-10-round-job-seconds": round(startup + rows[0]["seconds"] + (JOB_ROUNDS - 1) * median, 1),
        "extrapolation": f"deployment start-up + round 1 + {JOB_ROUNDS - 1} x median of rounds 2..N "
        "(extrapolated, not measured)",
    }


def run_phases(cli: FlwrCli, run_id: str, submitted: float, returned: float, elapsed: float) -> dict:
    """Where a run's time outside its rounds goes, from the SuperLink's own timestamps of
    the run (`flwr ls`: pending, running, finished) and our wall clock around `flwr run`."""
    run = cli.run_record(run_id) or {}
    try:
        at = {k: datetime.fromisoformat(run[f"{k}-at"]).timestamp() for k in ("pending", "running", "finished")}
    except (KeyError, TypeError, ValueError):
        return {"unavailable": f"flwr ls gave {run or 'no record of the run'}"}
    return {
        "submission": round(at["pending"] - submitted, 2),  # `flwr run`: its start, the FAB, the upload
        "serverapp-start": round(at["running"] - at["pending"], 2),  # SuperExec's poll, process start, imports
        "serverapp-outside-rounds": round(at["finished"] - at["running"] - elapsed, 2),  # set-up, final save, exit
        "finish-noticed": round(returned - at["finished"], 2),  # our status polling
    }


def parse_runs(text: str) -> list[tuple[str, float | None]]:
    """`fedavg,flexlora,fedavg@0.5`: aggregation, and a fraction other than the leaderboard's."""
    runs = []
    for spec in text.split(","):
        name, _, fraction = spec.partition("@")
        if name not in ("fedavg", "flexlora"):
            raise SystemExit(f"--runs {text!r}: {name!r} is not fedavg or flexlora")
        runs.append((name, float(fraction) if fraction else None))
    return runs


def trainers_that_fit(config, gpus: list[int]) -> int:
    """How many trainers fit the smallest of `gpus` without gradient checkpointing (the
    faster mode), by the trainer service's own rule and the memory torch sees."""
    import torch

    from app.gpu_admission import trainings_that_fit

    total = min(torch.cuda.get_device_properties(g).total_memory for g in gpus)
    return max(1, trainings_that_fit(replace(config.model, gradient_checkpointing=False), config.train, total))


@contextmanager
def docker_stack(
    args: argparse.Namespace, sent: dict, env: dict, trainers: int
) -> Iterator[tuple[FlwrCli, dict, Timeline, Callable[[], None]]]:
    """`deploy up` of this host's stack, torn down (`deploy down`) however the runs end.
    Yields the CLI of its connection, what the runs' overrides must say instead of host
    paths (the containers see the model at /model and the data file under /data), a
    timeline from `deploy up`'s start, and no liveness check (the stack waited for its trainers)."""
    model, data = Path(args.model).resolve(), Path(args.data).resolve()
    inside = {"model.name": "/model", "dataset.data-files": f"/data/{data.name}"}
    config = " ".join(f"{k}={json.dumps(v)}" for k, v in {**sent, **inside}.items())
    workdir = args.workdir / args.label
    layout = [
        "--gpus",
        args.gpus,
        "--gpu-request",
        args.gpu_request,
        "--dir",
        str(workdir),
        "--volume",
        f"{model}:/model:ro",
        "--volume",
        f"{data.parent}:/data:ro",
        "--run-config",
        config,
    ]
    env = {**env, "FLWR_HOME": str(workdir / "flwr-home")}
    deploy = [sys.executable, "-m", "deploy", "--app", str(ROOT)]
    subprocess.run([*deploy, "down", *layout], env=env, check=False, capture_output=True)
    try:
        timeline = Timeline()
        subprocess.run(
            [*deploy, "up", *layout, "--no-submit", "--trainers-per-gpu", str(trainers)], env=env, check=True
        )
        cli = FlwrCli(Path(sys.executable).parent / "flwr", workdir / "flwr-home", "remote-deployment", env)
        yield cli, inside, timeline, lambda: None
    finally:
        subprocess.run([*deploy, "down", *layout], env=env, check=False)


@contextmanager
def process_deployment(
    args: argparse.Namespace, topology, sent: dict, env: dict
) -> Iterator[tuple[FlwrCli, dict, Timeline, Callable[[], None]]]:
    """Up once the nodes are, as under `deploy run`: its timeline marks the trainers' readiness
    later, and its `check_alive` ends a run whose trainers cannot load at once."""
    with ProcessDeployment(
        topology, args.workdir / args.label, env, app_dir=ROOT, run_config=sent, wait_trainers=False
    ) as deployment:
        yield deployment.cli, {}, deployment.timeline, deployment.check_alive


@contextmanager
def simulation_engine(
    args: argparse.Namespace, env: dict
) -> Iterator[tuple[FlwrCli, dict, Timeline, Callable[[], None]]]:
    """The `local-simulation` connection in a FLWR_HOME of this label; the local SuperLink the
    first `flwr run` starts is stopped however the runs end."""
    home = args.workdir / args.label / "flwr-home"
    bin_dir = Path(sys.executable).parent
    env = {**local_superlink_env(env, home, bin_dir), "CUDA_VISIBLE_DEVICES": args.gpus}
    deploy = [sys.executable, "-m", "deploy", "--app", str(ROOT), "simulation", "--gpus", args.gpus]
    timeline = Timeline()
    subprocess.run(deploy, env=env, check=True)
    try:
        yield FlwrCli(bin_dir / "flwr", home, "local-simulation", env), {}, timeline, lambda: None
    finally:
        stop_local_superlink(home)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", required=True)
    ap.add_argument("--gpus", required=True)
    ap.add_argument("--trainers-per-gpu", type=int, help="0: train inside each ClientApp (default: the layout's)")
    ap.add_argument(
        "--fit-trainers",
        action="store_true",
        help="cap the layout's trainers per GPU at what fits without gradient checkpointing",
    )
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument(
        "--runs",
        default="fedavg",
        help="comma-separated fedavg|flexlora[@FRACTION]; a fraction runs with leaderboard=false",
    )
    ap.add_argument("--rounds", type=int, default=4, help="per run; the first is the warm-up")
    ap.add_argument("--run-config", default="", help="extra overrides, 'key=value ...'")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/round-bench"))
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--backend", choices=("process", "docker", "simulation"), default="process")
    ap.add_argument("--gpu-request", choices=("nvidia", "cdi"), default="nvidia", help="with --backend docker")
    args = ap.parse_args()

    from flwr.common.config import parse_config_args

    runs = parse_runs(args.runs)
    gpus = parse_gpus(args.gpus)
    base = {"model.name": args.model, "dataset.data-files": args.data, "num-server-rounds": args.rounds}
    base.update(parse_config_args([args.run_config]) if args.run_config else {})
    sent, config = resolve_run_config(ROOT, base)
    nodes = config.dataset.num_partitions
    # The deployment serves every run: its trainers are laid out for the largest fraction.
    per_round = max(
        (config.strategy if f is None else replace(config.strategy, fraction_train=f)).nodes_per_round(nodes)
        for _, f in runs
    )
    host = Host("localhost", gpus)
    trainers = args.trainers_per_gpu
    if args.fit_trainers:
        trainers = min(trainers_per_gpu(host, per_round, None), trainers_that_fit(config, gpus))
    topology = plan(nodes, [host], superlink_port=free_port(), nodes_per_round=per_round, trainers=trainers)
    result: dict = {
        "label": args.label,
        "backend": args.backend,
        "gpus": args.gpus,
        "trainers-per-gpu": topology.trainers[0].count if topology.trainers and args.backend != "simulation" else 0,
        "layout": ["local-simulation: virtual SuperNodes in Ray actors"]
        if args.backend == "simulation"
        else topology.table().splitlines()[:3],
        "runs": {},
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with GpuSampler() as sampler:
        start = time.monotonic()
        if args.backend == "docker":
            stack = docker_stack(args, sent, env, result["trainers-per-gpu"])
        elif args.backend == "simulation":
            stack = simulation_engine(args, env)
        else:
            stack = process_deployment(args, topology, sent, env)
        with stack as (cli, inside, timeline, alive):
            result["startup-seconds"] = round(time.monotonic() - start, 1)
            result["startup-timeline"] = timeline  # the trainers' readiness and the submission are marked later
            print(
                f"[{args.label}] deployment up in {result['startup-seconds']} s, "
                f"{result['trainers-per-gpu']} trainers per GPU, {timeline}",
                flush=True,
            )
            sampler.take(gpus)
            for name, fraction in runs:
                key = name if fraction is None else f"{name}@{fraction}"
                results = args.workdir / args.label / f"results-{key}"
                # A container writes results under its /app/results, the host's <workdir>/results.
                out = f"results/{key}" if args.backend == "docker" else str(results)
                if args.backend == "docker":
                    results = args.workdir / args.label / out
                overrides = {**sent, **inside, "strategy.use-flexlora": int(name == "flexlora"), "results.dir": out}
                if fraction is not None:
                    overrides.update({"leaderboard": False, "static.strategy.fraction-train": fraction})
                submitted = time.time()
                run_id = cli.submit(ROOT, overrides, args.workdir / args.label)
                timeline.mark("submitted")
                status, details = cli.wait_finished(run_id, timeout=3600, alive=alive)
                returned = time.time()
                run_seconds = returned - submitted
                if status != "finished:completed":
                    raise SystemExit(f"[{args.label} {key}] run {run_id}: {status} {details}")
                (run_dir,) = results.glob(f"*-run{run_id}")
                rounds = read_rounds(run_dir)
                rows, elapsed = round_rows(rounds), rounds[-1]["elapsed-seconds"]
                result["runs"][key] = {
                    "status": status,
                    "fraction": fraction or config.strategy.fraction_train,
                    "rounds": rows,
                    **summary(rows, result["startup-seconds"]),
                    "peak-gpu-mib": sampler.take(gpus),
                    # From `flwr run` until the status says finished, less the ServerApp's own
                    # elapsed time: submission, the ServerApp's start and the end's polling.
                    "outside-serverapp-seconds": round(run_seconds - elapsed, 1),
                    "outside-serverapp-parts": run_phases(cli, run_id, submitted, returned, elapsed),
                    # Measured, not extrapolated: `flwr run` until the SuperLink says finished; a
                    # 10-round first run on the deployment, with its start-up, is the user's whole job.
                    "run-seconds": round(run_seconds, 1),
                }
                if len(result["runs"]) == 1 and args.rounds == JOB_ROUNDS:
                    result["runs"][key]["measured-job-seconds"] = round(result["startup-seconds"] + run_seconds, 1)
                for r in rows:
                    print(
                        f"[{args.label} {key}] round {r['round']}: {r['seconds']} s = training {r['training']} + "
                        f"client start {r['client-start']} + aggregation {r['aggregation']} + exchange {r['exchange']}",
                        flush=True,
                    )
                print(
                    f"[{args.label} {key}] {status} {details}; median {result['runs'][key]['median-round-seconds']} s",
                    flush=True,
                )
                args.json.write_text(json.dumps(result, indent=1))
    result["peak-process-mib"] = sampler.processes
    args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
