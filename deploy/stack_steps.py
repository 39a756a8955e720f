"""The one-shot steps the stack runs for itself, inside its containers or processes.

Compose's `setup`, `model-fetch`, `register`, `submit` and `trainer-gpu<g>` services and
the process backend call these; a user runs the commands in `deploy.cli` instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from app.trainer_protocol import TrainerSpec
from app.trainer_service import supervise
from deploy.backends.docker import prepare_host_folder
from deploy.errors import DeployError
from deploy.fetch import fetch
from deploy.flwr_cli import Connection, FlwrCli, register_connection
from deploy.project import parse_overrides, resolve_run_config
from deploy.tls import TlsFiles, make_tls_material


def cmd_trainer(args: argparse.Namespace) -> int:
    """What each backend runs per GPU: the warm trainers for its SuperNodes, until stopped."""
    _, config = resolve_run_config(args.app, parse_overrides(args.run_config))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    supervise(TrainerSpec(args.dir, args.home, args.count, config.model, config.train, args.cache_partitions))
    return 0


def cmd_fetch_model(args: argparse.Namespace) -> int:
    """Run once per host before its SuperNodes start, so 20 nodes share one download."""
    overrides = parse_overrides(args.run_config)
    if args.model:
        overrides["model.name"] = args.model
    _, config = resolve_run_config(args.app, overrides)  # checks a local folder
    for line in fetch(config):
        print(line)
    return 0


def cmd_setup_host(args: argparse.Namespace) -> int:
    """What compose's one-shot `setup` service runs (as root) before anything else.

    With `--given` (a kit's stack, see deploy.kit) the TLS material came in the kit: it is
    only handed to the images' user, never made, so no host mints a key or a CA that the
    SuperLink does not know.
    """
    if args.results:
        prepare_host_folder(args.results)
    if args.certs and not args.given:
        if not args.keys:
            raise DeployError("setup-host --certs needs --keys: the SuperNodes' key pairs are made with the CA")
        nodes = [f"supernode-{i}" for i in range(args.nodes)]
        files = make_tls_material(args.certs, args.keys, args.name or ["superlink"], nodes)
        print(f"CA certificate: {files.ca_cert} (copy it to every SuperNode host and to `flwr` users)")
        print(f"SuperNode keys: {args.keys} (copy each node's .key to the host that runs it)")
    for folder in (args.certs, args.keys):
        if folder:
            prepare_host_folder(folder)
    if args.certs:
        _keep_ca_key_from_containers(TlsFiles.in_folder(args.certs))
    return 0


def _keep_ca_key_from_containers(files: TlsFiles) -> None:
    """prepare_host_folder hands the folder to the images' user; no other container binds
    ca.key (deploy.compose binds files one by one), and root's ownership keeps it so for
    anyone who binds the folder by hand: only this root step signs."""
    if os.geteuid() == 0 and files.ca_key.is_file():
        os.chown(files.ca_key, 0, 0)


def _stack_cli(superlink: str, root_certificate: Path | None) -> FlwrCli:
    """Inside a one-shot container: a connection to the stack's own SuperLink."""
    flwr_home = Path.home() / ".flwr"
    register_connection(flwr_home, Connection("stack", superlink, root_certificate))
    return FlwrCli(Path(sys.executable).parent / "flwr", flwr_home, "stack", dict(os.environ))


def cmd_register_nodes(args: argparse.Namespace) -> int:
    cli = _stack_cli(args.superlink, Path(args.root_certificates))
    keys = sorted(args.keys.glob("*.pub"))
    if not keys:
        raise DeployError(f"--keys {args.keys}: no public keys (*.pub) there")
    for key in keys:
        cli.register_node(key)
    print(f"{len(keys)} SuperNode keys registered")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    """What compose's one-shot `submit` service runs: the seed job, with the app's defaults."""
    sent, _ = resolve_run_config(args.app, parse_overrides(args.run_config))
    cli = _stack_cli(args.superlink, None if args.insecure else Path(args.root_certificates))
    cli.wait_for_nodes(args.nodes, timeout=args.timeout, alive=lambda: None)
    status = cli.run_to_completion(args.app, sent, cli.flwr_home)
    return 0 if status == "finished:completed" else 1


def add_commands(commands: argparse._SubParsersAction) -> None:
    p_setup = commands.add_parser("setup-host", help="results folder, TLS material, node keys (compose runs it)")
    p_setup.add_argument("--results", type=Path, help="results folder to hand to uid 1000")
    p_setup.add_argument("--certs", type=Path, help="folder for the CA and the SuperLink certificate")
    p_setup.add_argument("--name", action="append", help="a name or IP the SuperLink is reached by (repeat)")
    p_setup.add_argument("--keys", type=Path, help="folder for the SuperNodes' key pairs")
    p_setup.add_argument("--nodes", type=int, default=0, help="number of SuperNode key pairs")
    p_setup.add_argument(
        "--given", action="store_true", help="--certs and --keys came in a kit: hand them to uid 1000, make nothing"
    )
    p_setup.set_defaults(func=cmd_setup_host)

    p_register = commands.add_parser("register-nodes", help="register SuperNode public keys (compose runs it)")
    p_register.add_argument("--superlink", required=True, help="HOST:PORT")
    p_register.add_argument("--root-certificates", default="/certs/ca.crt")
    p_register.add_argument("--keys", type=Path, default=Path("/keys"), help="folder of *.pub keys")
    p_register.set_defaults(func=cmd_register_nodes)

    p_submit = commands.add_parser("submit", help="wait for the SuperNodes, run the app, stream its log")
    p_submit.add_argument("--superlink", required=True, help="HOST:PORT")
    p_submit.add_argument("--nodes", type=int, required=True, help="SuperNodes to wait for")
    p_submit.add_argument("--root-certificates", default="/certs/ca.crt")
    p_submit.add_argument("--insecure", action="store_true")
    p_submit.add_argument("--run-config", help="overrides, 'key=value ...'")
    p_submit.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the SuperNodes")
    p_submit.set_defaults(func=cmd_submit)

    p_trainer = commands.add_parser("trainer", help="run one GPU's warm trainers (the backends start it)")
    p_trainer.add_argument(
        "--dir", type=Path, required=True, help="the host's trainer folder: sockets, locks, auth key"
    )
    p_trainer.add_argument("--home", required=True, help="gpu<g> or cpu: the name nodes' trainer-home gives")
    p_trainer.add_argument("--count", type=int, default=1, help="trainers on this GPU")
    p_trainer.add_argument("--run-config", help="the overrides runs will send, 'key=value ...' or a .toml file")
    p_trainer.add_argument("--cache-partitions", type=int, default=20, help="tokenized partitions each trainer keeps")
    p_trainer.set_defaults(func=cmd_trainer)

    p_fetch = commands.add_parser(
        "fetch-model", help="fill the Hugging Face cache with the model and dataset (compose runs it)"
    )
    p_fetch.add_argument("--run-config", help="the overrides runs will send, 'key=value ...' (data files, model)")
    p_fetch.add_argument("--model", help="hub id or local folder (default: model.name in pyproject.toml)")
    p_fetch.set_defaults(func=cmd_fetch_model)
