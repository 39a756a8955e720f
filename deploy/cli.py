"""`deploy`: lay the federation out, start it, submit the run, stop everything after."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from flwr.common.config import parse_config_args

from app.config import ConfigError
from deploy.backends.process import ProcessDeployment, free_port
from deploy.demo import build_demo
from deploy.flwr_cli import DeployError
from deploy.project import default_run_config, resolve_run_config
from deploy.topology import Host, LayoutError, parse_gpus, plan


def _visible_gpus() -> tuple[int, ...]:
    import torch

    return tuple(range(torch.cuda.device_count()))


def _hosts(args: argparse.Namespace) -> list[Host]:
    if args.host:
        return [Host.parse(h) for h in args.host]
    gpus = parse_gpus(args.gpus) if args.gpus is not None else _visible_gpus()
    return [Host("localhost", gpus)]


def cmd_plan(args: argparse.Namespace) -> int:
    nodes = args.nodes or int(default_run_config(args.app)["static.dataset.num-partitions"])
    print(plan(nodes, _hosts(args)).table())
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    overrides = parse_config_args([args.run_config] if args.run_config else None)
    hosts = _hosts(args)
    if args.demo or (not hosts[0].gpus and "model.name" not in overrides):
        assets = build_demo(args.app / ".demo")
        print(f"No GPU or no model given: running the tiny embedded demo model ({assets.model_dir}).")
        overrides = {**assets.run_config(), **overrides}
    sent, config = resolve_run_config(args.app, overrides)
    topology = plan(config.dataset.num_partitions, hosts, superlink_port=args.port or free_port())
    print(topology.table())
    workdir = args.workdir or args.app / ".deploy"
    with ProcessDeployment(topology, workdir, os.environ) as deployment:
        print(f"SuperLink and {len(topology.nodes)} SuperNodes are up (logs: {deployment.workdir / 'logs'}).")
        run_id = deployment.cli.submit(args.app, sent, deployment.workdir)
        print(f"Run {run_id} submitted; streaming the ServerApp log.")
        deployment.cli.stream_logs(run_id)
        status, details = deployment.cli.wait_finished(run_id, timeout=60)
    print(f"Run {run_id}: {status} {details}".rstrip())
    print(f"Results: {config.results_dir}")
    return 0 if status == "finished:completed" else 1


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="deploy", description=__doc__)
    root.add_argument("--app", type=Path, default=Path.cwd(), help="the Flower app folder (default: here)")
    commands = root.add_subparsers(dest="command", required=True)

    def layout_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--gpus", help="GPU ids for the SuperNodes, e.g. 0,1,2,3 (default: all visible; none: CPU)")
        p.add_argument("--host", action="append", help="NAME or NAME=GPU,GPU (repeat per machine; first runs the SuperLink)")

    p_plan = commands.add_parser("plan", help="print the layout: node, partition, host, GPU")
    layout_args(p_plan)
    p_plan.add_argument("--nodes", type=int, help="number of SuperNodes (default: static.dataset.num-partitions)")
    p_plan.set_defaults(func=cmd_plan)

    p_run = commands.add_parser("run", help="start SuperLink and SuperNodes as processes, run the app, stop them")
    layout_args(p_run)
    p_run.add_argument("--demo", action="store_true", help="use the tiny embedded model and data (CPU, offline)")
    p_run.add_argument("--run-config", help="overrides, e.g. 'num-server-rounds=2 strategy.use-flexlora=1'")
    p_run.add_argument("--port", type=int, help="SuperLink port (default: a free one)")
    p_run.add_argument("--workdir", type=Path, help="logs and Flower state (default: APP/.deploy)")
    p_run.set_defaults(func=cmd_run)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.app = args.app.resolve()
    # A SIGTERM must unwind like Ctrl-C so every process we started is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return args.func(args)
    except (ConfigError, LayoutError, DeployError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: everything started was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
