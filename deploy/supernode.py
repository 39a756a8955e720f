"""`deploy supernode`: a SuperNode started by hand at a site, its node config checked first.

A plain `flower-supernode` with a bad `--node-config` (partition-id 20 of 20) joins the
federation unnoticed and fails only when it is sampled, maybe rounds later, with a traceback
in the site's log. This checks the node config against the app's layout and stops in one
line, then becomes `flower-supernode` with the same arguments (through `deploy.reaped`).
The rendered stacks and the process backend start `flower-supernode` themselves, with node
configs made from the layout.

    deploy supernode -- --superlink 10.0.0.5:8000 --node-config 'partition-id=3 num-partitions=20' ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flwr.common.config import parse_config_args

from app.config import ConfigError, NodeSettings
from deploy import reaped
from deploy.project import resolve_run_config


def cmd_supernode(args: argparse.Namespace) -> int:
    flower_args = args.flower_args[1:] if args.flower_args[:1] == ["--"] else args.flower_args
    if "--node-config" not in flower_args[:-1]:
        raise ConfigError(
            "deploy supernode: give --node-config 'partition-id=N num-partitions=20', as flower-supernode takes it"
        )
    text = flower_args[flower_args.index("--node-config") + 1]
    try:
        node_config = parse_config_args([text])
    except Exception:  # click's or TOML's error: the text is not key=value pairs
        raise ConfigError(f"--node-config {text!r}: expected space-separated key=value pairs") from None
    _, config = resolve_run_config(args.app, {}, local_model_here=False)
    NodeSettings.from_node_config(node_config, config)
    beside = Path(sys.executable).parent / "flower-supernode"  # this venv's, on PATH or not
    reaped.main([str(beside) if beside.is_file() else "flower-supernode", *flower_args])
    return 0  # not reached: flower-supernode replaces this process


def add_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "supernode", help="start flower-supernode by hand, after checking its --node-config against this app"
    )
    p.add_argument("flower_args", nargs=argparse.REMAINDER, help="flower-supernode's own arguments, after --")
    p.set_defaults(func=cmd_supernode)
