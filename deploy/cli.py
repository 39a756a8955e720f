"""`deploy`: lay the federation out, start it, submit the run, stop everything after."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from app.config import AppConfig, ConfigError
from app.evaluation import EvaluationError
from app.report import RESUME_JSON
from deploy import cdi, evaluation, stack_steps, supernode, swarm
from deploy.backends.docker import DockerDeployment
from deploy.backends.process import ProcessDeployment, free_port
from deploy.backends.swarm import STACK_LABEL, SwarmDeployment
from deploy.compose import GPU_REQUESTS, RenderOptions, dump, make_given_material, render, write
from deploy.demo import build_demo
from deploy.errors import DeployError
from deploy.flwr_cli import Connection, FlwrCli, SimulationConnection, register_connection
from deploy.images import GPU_BASE, build_images, outdated_images
from deploy.kit import IMAGE_WAYS, write_kits
from deploy.project import parse_overrides, resolve_run_config
from deploy.tls import TlsFiles
from deploy.topology import DEFAULT_PORT, Host, LayoutError, Topology, parse_gpus, plan


def _visible_gpus() -> tuple[int, ...]:
    import torch

    return tuple(range(torch.cuda.device_count()))


def _hosts(args: argparse.Namespace) -> list[Host]:
    if args.host:
        hosts = [Host.parse(h) for h in args.host]
    else:
        hosts = [Host("localhost", parse_gpus(args.gpus) if args.gpus is not None else _visible_gpus())]
    server = getattr(args, "server_host", None)
    return [Host.server(server), *hosts] if server else hosts


def _trainers(args: argparse.Namespace, config: AppConfig) -> int | None:
    """--trainers-per-gpu, else train.max-trainings-per-gpu when set, else the layout's default."""
    if args.trainers_per_gpu is not None:
        return args.trainers_per_gpu
    return config.train.max_trainings_per_gpu or None


def _plan(args: argparse.Namespace, config: AppConfig, **where) -> Topology:
    nodes = config.dataset.num_partitions
    return plan(
        nodes,
        _hosts(args),
        nodes_per_round=config.strategy.nodes_per_round(nodes),
        trainers=_trainers(args, config),
        **where,
    )


def cmd_plan(args: argparse.Namespace) -> int:
    _, config = resolve_run_config(args.app, {})
    print(_plan(args, config).table())
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    overrides = parse_overrides(args.run_config)
    hosts = _hosts(args)
    if args.demo or (not hosts[0].gpus and "model.name" not in overrides):
        assets = build_demo(args.app / ".demo")
        print(f"No GPU or no model given: running the tiny embedded demo model ({assets.model_dir}).")
        overrides = {**assets.run_config(), **overrides}
    if args.resume:
        overrides["results.resume-from"] = str(args.resume.resolve())
    sent, config = resolve_run_config(args.app, overrides)
    if config.resume_from is not None:
        from app.checkpoint import ResumeState  # torch: only when resuming

        resumed = ResumeState.read(config.resume_from, config)
        print(f"Resuming {config.resume_from} after round {resumed.round} of {config.strategy.num_rounds}.")
        if resumed.metrics_dropped:
            print(resumed.metrics_dropped)
    topology = _plan(args, config, superlink_port=args.port or free_port())
    _check_layout(config, topology)
    check_results_dir(config.results_dir)
    print(topology.table())
    workdir = args.workdir or args.app / ".deploy"
    with ProcessDeployment(
        topology, workdir, os.environ, app_dir=args.app, run_config=sent, wait_trainers=False
    ) as deployment:
        print(f"SuperLink and {len(topology.nodes)} SuperNodes are up (logs: {deployment.workdir / 'logs'}).")
        status = run_on(deployment, args.app, sent, config)
    print(f"Results: {config.results_dir}")
    return 0 if status == "finished:completed" else 1


def run_on(deployment: ProcessDeployment, app: Path, sent: dict, config: AppConfig) -> str:
    """Submits the run and follows it to its end; the run's final status. Submitted as soon
    as the nodes are online, its ServerApp starts while the trainers may still load the
    model. A process of the deployment that dies meanwhile (the SuperLink, a trainer
    supervisor that gave up loading) ends it with one line: the death, and what of the run
    is saved, which decides whether `--resume` can help."""
    run_id = deployment.cli.submit(app, sent, deployment.workdir)
    deployment.timeline.mark("submitted")
    try:
        return deployment.cli.watch_run(run_id, alive=deployment.check_alive)
    except DeployError as died:  # everything is stopped on the way out
        folder = config.resume_from or next(config.results_dir.glob(f"*-run{run_id}"), None)
        if folder is None or not (folder / RESUME_JSON).is_file():
            raise DeployError(f"{died}; the run stopped before it completed a round: nothing to resume") from None
        raise DeployError(
            f"{died}; the rounds completed so far are saved in the run's folder under {config.results_dir}: "
            "continue with `deploy run --resume FOLDER`"
        ) from None


def _check_layout(config: AppConfig, topology: Topology) -> None:
    """Every client would fail and every round keep the old adapter: stop before starting."""
    if config.model.quantization and all(node.gpu is None for node in topology.nodes):
        raise ConfigError(
            f"model.quantization = {config.model.quantization}: needs CUDA GPUs, and this layout has none; "
            "use model.quantization=0"
        )


def check_results_dir(folder: Path) -> None:
    """The ServerApp writes every round here; a folder it cannot write would stop the run
    after the whole deployment started. Checked for the process that runs the check."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        what = "is not a folder" if existing == folder else f"cannot be made: {existing} is not a folder"
        raise ConfigError(f"results.dir = '{folder}': {what}")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == folder else f" ({existing}, where it would be made)"
        raise ConfigError(f"results.dir = '{folder}': not writable by uid {os.getuid()}{where}")


def _stack_config(args: argparse.Namespace) -> tuple[dict, AppConfig]:
    """The overrides a stack's trainers and `submit` service run with, checked."""
    return resolve_run_config(args.app, parse_overrides(args.run_config))


def _topology(args: argparse.Namespace, check: bool = True) -> Topology:
    """A stack's layout, after the checks `deploy run` makes, so that `render`, `kit` and `up`
    refuse a bad run config before writing or starting anything. Paths in it are the
    containers' (e.g. /model): the model folder is checked where it is read (model-fetch).
    `check=False` (status, logs, down): only the layout's own setting is read, so a stack is
    reachable whatever it was started with."""
    overrides = parse_overrides(args.run_config)
    if not check:
        overrides = {k: v for k, v in overrides.items() if k == "train.max-trainings-per-gpu"}
    _, config = resolve_run_config(args.app, overrides, local_model_here=False)
    topology = _plan(args, config, superlink_address=args.superlink_address, superlink_port=args.port)
    if check:
        _check_layout(config, topology)
    return topology


def _render_options(args: argparse.Namespace) -> RenderOptions:
    return RenderOptions(
        insecure=args.insecure,
        model=args.model,
        extra_volumes=tuple(args.volume or ()),
        run_config=args.run_config or "",
        gpu_request=args.gpu_request,
    )


def _swarm_stack(args: argparse.Namespace, topology: Topology) -> dict:
    """The token is named by the variable, as for compose: a stack file never holds a path of yours."""
    hub_token = bool(os.environ.get("HF_TOKEN_FILE"))
    return swarm.render(topology, _render_options(args), hub_token=hub_token, overlay=args.overlay)


def cmd_render(args: argparse.Namespace) -> int:
    topology = _topology(args)  # checked before the folder is made: a refusal leaves nothing
    if args.engine == "swarm":
        stack = _swarm_stack(args, topology)
        args.out.mkdir(parents=True, exist_ok=True)
        make_given_material(topology, _render_options(args), args.dir or args.app)  # its secrets' files
        (args.out / swarm.STACK_FILE).write_text(dump(stack))
        print(args.out / swarm.STACK_FILE)
        print(
            f"On a manager, label each host's node once, then: docker stack deploy -c {swarm.STACK_FILE} {swarm.STACK}"
        )
        print("\n".join(swarm.label_commands(host.name for host in topology.hosts)))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for path in write(topology, args.out, _render_options(args)):
        print(path)
    return 0


def cmd_kit(args: argparse.Namespace) -> int:
    """A folder per host to hand to its site (deploy.kit); the TLS material is made or reused in
    --dir's .deploy/, as `deploy up` on this machine would."""
    if not args.host:
        raise DeployError("--host: name every machine (NAME or NAME=GPU,GPU, repeated; the first runs the SuperLink)")
    kits = write_kits(
        _topology(args), _render_options(args), args.app, args.dir or args.app, args.out, args.images, args.archive
    )
    for kit in kits:
        print(f"{kit.archive or kit.folder}  start inside with: {kit.start}")
    return 0


def _docker(args: argparse.Namespace, check: bool = True) -> tuple[DockerDeployment, Topology]:
    topology = _topology(args, check)
    document = render(topology, _render_options(args))[topology.superlink_host]
    return DockerDeployment(document, args.dir or args.app, dict(os.environ)), topology


def _deployment(args: argparse.Namespace) -> DockerDeployment | SwarmDeployment:
    """The stack `status`, `logs` and `down` reach: this host's compose stack, or the swarm's."""
    if args.engine == "swarm":
        return SwarmDeployment(_swarm_stack(args, _topology(args, check=False)), args.dir or args.app, dict(os.environ))
    return _docker(args, check=False)[0]


def _flwr_home() -> Path:
    """Where `flwr` looks for its config; the connection we register must land there."""
    return Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))


def cmd_up_process(args: argparse.Namespace) -> int:
    """The same topology as plain processes, in the foreground until Ctrl-C."""
    topology = _topology(args)
    sent, _ = _stack_config(args)
    workdir = (args.dir or args.app) / ".deploy"
    with ProcessDeployment(
        topology, workdir, os.environ, args.connection, app_dir=args.app, run_config=sent
    ) as deployment:
        register_connection(_flwr_home(), deployment.connection)
        print(f"{len(topology.nodes)} SuperNodes online. Submit with: flwr run . {args.connection} (Ctrl-C stops)")
        while True:
            deployment.check_alive()
            time.sleep(5)


def cmd_up_swarm(args: argparse.Namespace) -> int:
    """The whole federation from one manager: the images must already be on every node."""
    if args.backend == "process":
        raise DeployError("--backend process: runs no engine; leave it out with --engine swarm")
    if args.build:
        raise DeployError("--build: a swarm's nodes cannot share a build; load the images on every node instead")
    topology = _topology(args)
    stack = _swarm_stack(args, topology)
    if args.no_submit:
        del stack["services"]["submit"]
    folder = args.dir or args.app
    make_given_material(topology, _render_options(args), folder)
    deployment = SwarmDeployment(stack, folder, dict(os.environ))
    unplaced = deployment.label_nodes([host.name for host in topology.hosts])
    if unplaced:
        print("\n".join(swarm.label_commands(unplaced)))
        raise DeployError(
            f"--host {', '.join(unplaced)}: no swarm node has that hostname or label; label each one's node with "
            "the commands above (NODE from `docker node ls`), then run again"
        )
    started = time.monotonic()
    try:
        deployment.up()
    except DeployError as failed:
        raise DeployError(f"{failed}; `deploy down --engine swarm` with the same options removes the stack") from None
    ca = TlsFiles.in_folder(folder / ".deploy" / "certs").ca_cert
    register_connection(_flwr_home(), Connection(args.connection, topology.superlink_endpoint, ca))
    cli = FlwrCli(Path(sys.executable).parent / "flwr", _flwr_home(), args.connection, dict(os.environ))
    cli.wait_for_nodes(len(topology.nodes), timeout=600, alive=lambda: None)
    seconds = time.monotonic() - started
    print(f"Stack up: {len(topology.nodes)} SuperNodes on {len(topology.hosts)} hosts online in {seconds:.0f} s.")
    print(f"Submit with: flwr run . {args.connection}" if args.no_submit else "`submit` runs the app.")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    if args.engine == "swarm":
        return cmd_up_swarm(args)
    if args.backend == "process":
        if not args.insecure:
            raise DeployError("the process backend serves plain HTTP on 127.0.0.1: pass --insecure")
        return cmd_up_process(args)
    if os.environ.get("HF_TOKEN") and not os.environ.get("HF_TOKEN_FILE"):
        # Containers take the token from a file (a compose secret), never from the environment.
        print(
            "warning: HF_TOKEN is set but not passed on; give the stack a file: HF_TOKEN_FILE=/path/to/token",
            file=sys.stderr,
        )
    # Bound at /app/results, where `setup` hands it to uid 1000; checked before the engine is asked.
    check_results_dir((args.dir or args.app) / "results")
    deployment, topology = _docker(args)
    client = deployment.client
    if args.build or outdated_images(client, args.app):
        print("Building images (docker/Dockerfile); the torch layer is reused when only code changed ...")
        build_images(args.app, args.base_image, args.torch)
    # The `setup` service prepares results, CA and keys, as under `docker compose up`.
    try:
        deployment.up(skip=frozenset({"submit"}) if args.no_submit else frozenset())
    except DeployError as failed:
        started = len(deployment.containers())
        raise DeployError(
            f"{failed}; {started} containers of this stack are left for their logs (`deploy logs SERVICE`): "
            "`deploy down` with the same options removes them"
        ) from None
    ca = None if args.insecure else TlsFiles.in_folder(deployment.compose_dir / ".deploy" / "certs").ca_cert
    connection = Connection(args.connection, f"127.0.0.1:{topology.superlink_port}", ca)
    flwr_home = _flwr_home()
    register_connection(flwr_home, connection)
    cli = FlwrCli(Path(sys.executable).parent / "flwr", flwr_home, args.connection, dict(os.environ))
    local_nodes = len(topology.nodes_on(topology.superlink_host))
    cli.wait_for_nodes(local_nodes, timeout=300, alive=lambda: None)
    print(f"Stack up: {local_nodes} SuperNodes online. Submit with: flwr run . {args.connection}")
    return 0


def cmd_simulation(args: argparse.Namespace) -> int:
    """Registers the connection that runs this app unchanged in Flower's Simulation Engine, with
    the seed's settings: one virtual SuperNode per partition, 2 CPUs and (where GPUs are
    visible) 1 GPU per ClientApp."""
    _, config = resolve_run_config(args.app, {})
    gpus = parse_gpus(args.gpus) if args.gpus is not None else _visible_gpus()
    connection = SimulationConnection(args.connection, config.dataset.num_partitions, 2, 1.0 if gpus else 0.0)
    path = register_connection(_flwr_home(), connection)
    print(
        f"Registered {args.connection} in {path}: {connection.num_supernodes} virtual SuperNodes, "
        f"{connection.num_cpus} CPUs and {connection.num_gpus:g} GPU per ClientApp.\n"
        "Run it with the venv's bin on PATH (flwr starts flower-superlink by name): "
        f"flwr run . {args.connection} --stream"
    )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    deployment = _deployment(args)
    header = ("service", "host", "node", "task") if args.engine == "swarm" else ("service", "state", "health")
    rows = [header, *deployment.status()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    print(_deployment(args).logs(args.service, tail=args.tail), end="")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    _deployment(args).down()
    if args.engine == "swarm":
        print(
            "Removed the stack's services, secrets and network, and its volumes on this engine. Other nodes keep "
            f"their volumes: there, docker volume rm $(docker volume ls -q --filter label={STACK_LABEL}={swarm.STACK})"
        )
    else:
        print("Removed every container, network and volume `deploy up` created.")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Redraws each run's summary and plots; several runs also share one comparison chart."""
    from app.report import METRICS_JSONL, read_metrics, write_plots, write_summary

    for run in args.runs:  # every folder is checked before any is redrawn
        if not (run / METRICS_JSONL).is_file():
            raise DeployError(f"{run}: not a run folder (no {METRICS_JSONL} in it)")
        dropped = read_metrics(run).dropped
        if dropped:
            print(dropped)
    for run in args.runs:
        summary = write_summary(run)
        write_plots([run], run)
        print(
            f"{run}: {summary['rounds-completed']} rounds, final loss {summary['final-loss']}, "
            "summary.md, loss.png, round_time.png"
        )
    if len(args.runs) > 1:
        for path in write_plots(args.runs, args.out):
            print(path)
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="deploy", description=__doc__)
    root.add_argument("--app", type=Path, default=Path.cwd(), help="the Flower app folder (default: here)")
    commands = root.add_subparsers(dest="command", required=True)

    def layout_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--gpus", help="GPU ids for the SuperNodes, e.g. 0,1,2,3 (default: all visible; none: CPU)")
        p.add_argument(
            "--host", action="append", help="NAME or NAME=GPU,GPU (repeat per machine; first runs the SuperLink)"
        )
        p.add_argument(
            "--trainers-per-gpu",
            type=int,
            help="warm trainers per GPU; 0: each ClientApp trains in its own process "
            "(default: train.max-trainings-per-gpu if set, else enough for a round's sampled nodes)",
        )

    def server_host_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--server-host",
            help="a machine for the SuperLink and ServerApp only, no SuperNodes (default: the first --host runs them)",
        )

    p_plan = commands.add_parser("plan", help="print the layout: node, partition, host, GPU, trainer")
    layout_args(p_plan)
    server_host_arg(p_plan)
    p_plan.set_defaults(func=cmd_plan)

    p_run = commands.add_parser("run", help="start SuperLink and SuperNodes as processes, run the app, stop them")
    layout_args(p_run)
    p_run.add_argument("--demo", action="store_true", help="use the tiny embedded model and data (CPU, offline)")
    p_run.add_argument("--run-config", help="overrides, e.g. 'num-server-rounds=2 strategy.use-flexlora=1'")
    p_run.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue this run folder from its last completed round (pass the same --run-config)",
    )
    p_run.add_argument("--port", type=int, help="SuperLink port (default: a free one)")
    p_run.add_argument("--workdir", type=Path, help="logs and Flower state (default: APP/.deploy)")
    p_run.set_defaults(func=cmd_run)

    def stack_args(p: argparse.ArgumentParser) -> None:
        layout_args(p)
        server_host_arg(p)
        p.add_argument("--superlink-address", help="address other hosts reach the SuperLink at (default: first host)")
        p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"SuperLink port (default {DEFAULT_PORT})")
        p.add_argument("--insecure", action="store_true", help="no TLS (local experiments only)")
        p.add_argument("--model", help="model the fetch step caches (default: model.name in pyproject.toml)")
        p.add_argument("--volume", action="append", help="extra SRC:DST[:ro] mount for app containers, e.g. data")
        p.add_argument("--run-config", help="overrides the `submit` service runs the job with, 'key=value ...'")
        p.add_argument("--dir", type=Path, help="where compose-relative paths (certs, results) live (default: --app)")
        p.add_argument(
            "--gpu-request",
            choices=GPU_REQUESTS,
            default="nvidia",
            help="how containers ask for their GPU: NVIDIA's container runtime (default) or a CDI device "
            "nvidia.com/gpu=N (engines with CDI enabled; `deploy cdi-spec` writes the spec where the toolkit "
            "is absent)",
        )

    def engine_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--engine",
            choices=("compose", "swarm"),
            default="compose",
            help="compose: one stack per host (default); swarm: one stack over a Docker Swarm, from its manager",
        )
        p.add_argument(
            "--overlay",
            choices=swarm.OVERLAYS,
            default="encrypted",
            help="swarm's overlay network: encrypted (IPsec, default) or plain, for kernels without IPsec ESP "
            "(Flower's TLS still protects every connection)",
        )

    p_render = commands.add_parser(
        "render", help="write compose files (compose.yaml, compose.<host>.yaml) or a swarm stack (stack.yaml)"
    )
    stack_args(p_render)
    engine_args(p_render)
    p_render.add_argument("--out", type=Path, default=Path("."), help="folder for the files (default: here)")
    p_render.set_defaults(func=cmd_render)

    p_kit = commands.add_parser("kit", help="one folder per host: compose file, certificates, keys, images")
    stack_args(p_kit)
    p_kit.add_argument("--out", type=Path, default=Path("kits"), help="a new or empty folder (default: ./kits)")
    p_kit.add_argument(
        "--images",
        choices=IMAGE_WAYS,
        default="build",
        help="build: ship the build context, each host builds (no engine needed here); "
        "save: ship `docker save` archives of this engine's images (large; nothing to fetch there)",
    )
    p_kit.add_argument("--archive", action="store_true", help="also pack each kit as <out>/<host>.tar.gz")
    p_kit.set_defaults(func=cmd_kit)

    p_up = commands.add_parser("up", help="start this host's stack (or the swarm's) and wait until it is ready")
    stack_args(p_up)
    engine_args(p_up)
    p_up.add_argument("--connection", default="remote-deployment", help="name registered in Flower's config")
    p_up.add_argument(
        "--backend", choices=("docker", "process"), default="docker", help="containers or local processes"
    )
    p_up.add_argument("--no-submit", action="store_true", help="start the stack only; submit runs yourself")
    p_up.add_argument("--build", action="store_true", help="rebuild the images even if they exist")
    p_up.add_argument("--base-image", default=GPU_BASE, help="base image (default: the Dockerfile's CUDA PyTorch)")
    p_up.add_argument("--torch", help="torch requirement for the wheelhouse; 'none' if the base has torch")
    p_up.set_defaults(func=cmd_up)
    p_sim = commands.add_parser(
        "simulation", help="register a Flower connection that runs the app in Flower's Simulation Engine"
    )
    p_sim.add_argument("--connection", default="local-simulation", help="name registered in Flower's config")
    p_sim.add_argument("--gpus", help="GPU ids Ray may use, e.g. 0,1 (default: all visible; none: CPU only)")
    p_sim.set_defaults(func=cmd_simulation)
    for name, func, text in (
        ("status", cmd_status, "per-service state and health; with --engine swarm each task's host, node and state"),
        ("down", cmd_down, "remove what `deploy up` started"),
    ):
        p = commands.add_parser(name, help=text)
        stack_args(p)
        engine_args(p)
        p.set_defaults(func=func)
    p_logs = commands.add_parser("logs", help="a service's recent log")
    stack_args(p_logs)
    engine_args(p_logs)
    p_logs.add_argument("service")
    p_logs.add_argument("--tail", type=int, default=100)
    p_logs.set_defaults(func=cmd_logs)

    p_report = commands.add_parser("report", help="redraw runs' summaries and plots; several runs on one chart")
    p_report.add_argument("runs", nargs="+", type=Path, help="run folders (results/<date>-<time>-run<id>)")
    p_report.add_argument(
        "--out", type=Path, default=Path("report"), help="folder for the comparison charts (default: ./report)"
    )
    p_report.set_defaults(func=cmd_report)

    evaluation.add_command(commands)
    cdi.add_command(commands)
    supernode.add_command(commands)
    stack_steps.add_commands(commands)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.app = args.app.resolve()
    # A SIGTERM must unwind like Ctrl-C so every process we started is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return args.func(args)
    except (ConfigError, LayoutError, DeployError, EvaluationError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: everything started was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
