"""Starts a Topology as plain processes on this machine: no Docker needed.

One `flower-superlink`, one `deploy trainer` supervisor per GPU (the warm trainers,
started first so they load the model while the SuperNodes connect, and while a run that
does not wait for them starts its ServerApp) and one
`flower-supernode` per node, each with its own FLWR_HOME, Runtime API port and
`CUDA_VISIBLE_DEVICES`. Every process is started in its own process group so that
stopping the deployment also stops the SuperExec, ClientApp and trainer processes
spawned beneath it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil

from app.trainer_client import TrainerUnavailable, ping
from app.trainer_protocol import ensure_authkey, trainer_name
from deploy.errors import DeployError
from deploy.fetch import fetch
from deploy.flwr_cli import Connection, FlwrCli, register_connection, write_run_config
from deploy.project import resolve_run_config
from deploy.reaped import PREFIX as REAPED
from deploy.timeline import Timeline
from deploy.topology import SUPERNODE_ENV, Topology

# Trainers load the model before they listen: a 9B download or a cold page cache is slow.
TRAINER_TIMEOUT = 1800
# A SuperNode that dies this soon after a start is restarted no sooner: one that cannot
# start (a bad node config) retries every RESTART_BACKOFF seconds, not in a tight loop.
RESTART_BACKOFF = 10.0


def free_ports(count: int) -> list[int]:
    """Distinct ports: all are held open together, so the OS cannot hand one out twice."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


@dataclass
class _Started:
    name: str
    process: subprocess.Popen
    log_path: Path
    log: IO = field(repr=False)
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict, repr=False)
    restarts: int = 0
    started_at: float = field(default_factory=time.monotonic)

    @property
    def is_node(self) -> bool:
        """SuperNodes are what the watcher restarts."""
        return self.name.startswith("supernode-")


class ProcessDeployment:
    """Use as a context manager: whatever happens inside, everything started is stopped.

    Once up, a watcher restarts any SuperNode that exits (a crash, an OOM kill, a stray
    `kill -9`), as compose's restart policy does for the containers: the node rejoins
    under a new node id with its partition, and the run samples it again. The SuperLink
    and the trainer supervisors are not restarted here (the supervisors restart their
    own trainers); `check_alive` reports them.

    With `wait_trainers` False, up() returns once the SuperNodes are online, so that a run
    submitted then starts its ServerApp while the trainers still load the model (a ClientApp
    waits for a trainer that is loading). A watcher marks when they are ready; `check_alive`
    then also reports a trainer not ready within the run config's round timeout, which
    would otherwise cost the first round.
    """

    def __init__(
        self,
        topology: Topology,
        workdir: Path,
        env: Mapping[str, str],
        connection_name: str = "local-deployment",
        bin_dir: Path = Path(sys.executable).parent,
        app_dir: Path | None = None,
        run_config: Mapping[str, Any] | None = None,
        wait_trainers: bool = True,
    ):
        """`app_dir` and `run_config` (the overrides runs will send) tell trainers what to load."""
        if len(topology.hosts) != 1:
            raise DeployError(f"the process backend runs one host; this layout has {len(topology.hosts)}")
        self.topology = topology
        self.workdir = workdir.resolve()
        self.bin_dir = bin_dir
        # flower-superlink and -supernode start `flower-superexec` by name from PATH.
        self.env = {**env, "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"}
        self.connection = Connection(connection_name, f"127.0.0.1:{topology.superlink_port}")
        self.cli = FlwrCli(bin_dir / "flwr", self.workdir / "flwr-home", connection_name, self.env)
        self.trainer_dir = self.workdir / "trainers"
        self.app_dir = app_dir
        self.run_config = dict(run_config or {})
        self._started: list[_Started] = []
        self._lock = threading.Lock()  # the watcher replaces entries of _started
        self._stop_watching = threading.Event()
        self._watcher: threading.Thread | None = None
        self.wait_trainers = wait_trainers
        self._trainer_watcher: threading.Thread | None = None
        self._trainers_failed: DeployError | None = None
        self.timeline = Timeline()  # afresh at up()'s start: seconds from it until each part answered

    def __enter__(self) -> ProcessDeployment:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self, timeout: float = 180) -> None:
        self.timeline = Timeline()
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        trainer_timeout = TRAINER_TIMEOUT
        if self.app_dir is not None:  # a model or data that cannot be had stops us before anything starts
            config = resolve_run_config(self.app_dir, self.run_config)[1]
            for line in fetch(config):
                print(line, flush=True)
            if not self.wait_trainers:
                trainer_timeout = min(TRAINER_TIMEOUT, config.strategy.round_timeout)
        self.timeline.mark("checked")
        # Trainers need neither the SuperLink nor a port: started first, their imports and model
        # load, the longest part of a start-up on a GPU host, overlap the SuperLink's and nodes'.
        self._start_trainers()
        # Each start is a new federation: nodes of earlier starts would linger as offline.
        (self.workdir / "superlink.db").unlink(missing_ok=True)
        register_connection(self.cli.flwr_home, self.connection)
        self.start(
            "superlink",
            [
                *REAPED,
                "flower-superlink",
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.topology.superlink_port),
                "--database",
                str(self.workdir / "superlink.db"),
                # The app's dependencies are this environment's; never pip-install at run time.
                "--disable-runtime-dependency-installation",
            ],
            {"FLWR_HOME": str(self.workdir / "superlink-home")},
        )
        # The SuperLink must hold its port before the nodes' Runtime API ports are picked.
        self.cli.wait_for_nodes(0, timeout, self.check_alive)
        self.timeline.mark("superlink")
        for node, port in zip(self.topology.nodes, free_ports(len(self.topology.nodes))):
            self.start(
                node.name,
                [
                    *REAPED,
                    "flower-supernode",
                    "--insecure",
                    "--superlink",
                    self.connection.address,
                    "--node-config",
                    f"{node.node_config} {self._training_config(node)}",
                    "--port",
                    str(port),
                ],
                {
                    "FLWR_HOME": str(self.workdir / "nodes" / node.name),
                    "CUDA_VISIBLE_DEVICES": "" if node.gpu is None else str(node.gpu),
                    **SUPERNODE_ENV,
                },
            )
        self.cli.wait_for_nodes(len(self.topology.nodes), timeout, self.check_alive)
        self.timeline.mark("supernodes")
        if self.wait_trainers:
            self._await_trainers(trainer_timeout)
        self._watcher = threading.Thread(target=self._watch, name="supernode-watcher", daemon=True)
        self._watcher.start()
        if not self.wait_trainers:  # after the node watcher: a node's death is its to handle now
            self._trainer_watcher = threading.Thread(
                target=self._watch_trainers, args=(trainer_timeout,), name="trainer-watcher", daemon=True
            )
            self._trainer_watcher.start()

    def _watch(self, period: float = 1.0) -> None:
        while not self._stop_watching.wait(period):
            with self._lock:
                for k, started in enumerate(self._started):
                    if (
                        started.is_node
                        and (code := started.process.poll()) is not None
                        and time.monotonic() - started.started_at >= RESTART_BACKOFF
                    ):
                        self._started[k] = self._restart(started, code)

    def _training_config(self, node) -> str:
        """Node config: the host's trainers and this node's own, or the in-process GPU locks."""
        if self.topology.trainer_of(node) is None:
            return f'lock-dir="{self.workdir / "locks"}"'
        return f'trainer-dir="{self.trainer_dir}" trainer-home="{node.trainer_home}"'

    def _start_trainers(self) -> None:
        if not self.topology.trainers:
            return
        if self.app_dir is None:
            raise DeployError("trainers need the app folder: pass app_dir to ProcessDeployment")
        shutil.rmtree(self.trainer_dir, ignore_errors=True)  # no locks or sockets of an earlier start
        ensure_authkey(self.trainer_dir)
        overrides = write_run_config(self.workdir / "trainer-run-config.toml", self.run_config)
        for group in self.topology.trainers:
            self.start(
                group.name,
                [
                    "python",
                    "-m",
                    "deploy",
                    "--app",
                    str(self.app_dir),
                    "trainer",
                    "--dir",
                    str(self.trainer_dir),
                    "--home",
                    group.home,
                    "--count",
                    str(group.count),
                    "--run-config",
                    str(overrides),
                ],
                {"CUDA_VISIBLE_DEVICES": "" if group.gpu is None else str(group.gpu)},
            )

    def trainer_names(self) -> list[str]:
        return [trainer_name(g.home, k) for g in self.topology.trainers for k in range(g.count)]

    def _await_trainers(self, timeout: float) -> None:
        """Every trainer answers a handshake once its model is loaded; then the timeline marks
        them ready. Raises for a process that died or a trainer still not ready after `timeout`;
        returns unmarked once the deployment is stopping."""
        deadline = time.monotonic() + timeout
        for name in self.trainer_names():
            while not self._stop_watching.is_set():
                try:
                    ping(self.trainer_dir, name, timeout=1)
                    break
                except TrainerUnavailable:
                    self.check_alive()
                    if time.monotonic() > deadline:
                        why = ", the run's round timeout (strategy.round-timeout)" if timeout < TRAINER_TIMEOUT else ""
                        raise DeployError(
                            f"trainer {name} not ready after {timeout:.0f} s{why} (log: {self.workdir / 'logs'})"
                        ) from None
            else:  # the deployment is stopping
                return
        self.timeline.mark("trainers")

    def _watch_trainers(self, timeout: float) -> None:
        """`_await_trainers` beside a submitted run: its error is kept for `check_alive`, which
        the run's follower asks, so that a trainer that cannot load stops the run at once."""
        try:
            self._await_trainers(timeout)
        except DeployError as failed:
            self._trainers_failed = failed
        except Exception as failed:  # a trainer that died mid-handshake, a refusal: never a silent thread
            self._trainers_failed = DeployError(f"watching the trainers failed: {type(failed).__name__}: {failed}")

    def start(self, name: str, argv: list[str], extra_env: Mapping[str, str]) -> None:
        """One more process of the deployment, stopped with it; its log goes to logs/<name>.log."""
        log_path = self.workdir / "logs" / f"{name}.log"
        log = log_path.open("w")
        argv = [str(self.bin_dir / argv[0]), *argv[1:]]
        env = {**self.env, **extra_env}
        self._started.append(_Started(name, self._popen(argv, env, log), log_path, log, argv, env))

    def _popen(self, argv: list[str], env: dict[str, str], log: IO) -> subprocess.Popen:
        return subprocess.Popen(
            argv,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            # The ServerApp inherits this folder: a relative results.dir from a plain
            # `flwr run` lands in the app folder, as it does under `deploy run`.
            cwd=self.app_dir,
        )

    def _restart(self, started: _Started, code: int) -> _Started:
        """The same command in the same FLWR_HOME; what the dead node left running beneath
        it (a ClientApp mid-round) is killed first, so it cannot answer for the new node."""
        _signal_group(started.process, signal.SIGKILL)
        line = (
            f"{started.name} exited with code {code}; "
            f"restarted (restart {started.restarts + 1}, log: {started.log_path})"
        )
        started.log.write(f"\n=== deploy: {line}\n")
        started.log.flush()
        print(line, flush=True)
        return dataclasses.replace(
            started,
            process=self._popen(started.argv, started.env, started.log),
            restarts=started.restarts + 1,
            started_at=time.monotonic(),
        )

    def restarts(self) -> dict[str, int]:
        with self._lock:
            return {s.name: s.restarts for s in self._started if s.restarts}

    def check_alive(self) -> None:
        """Raises for a process that is down and will not come back by itself, or for trainers
        that the watcher gave up on."""
        if self._trainers_failed is not None:
            raise self._trainers_failed
        with self._lock:
            started_now = list(self._started)
        for started in started_now:
            code = started.process.poll()
            if code is not None and not (self._watcher and started.is_node):
                tail = started.log_path.read_text().strip().splitlines()[-1:] or ["(no output)"]
                raise DeployError(f"{started.name} exited with code {code}: {tail[0]} (log: {started.log_path})")

    def pids(self) -> list[int]:
        with self._lock:
            return [s.process.pid for s in self._started]

    def pid_of(self, name: str) -> int:
        with self._lock:
            return next(s.process.pid for s in self._started if s.name == name)

    def _descendants(self) -> list[psutil.Process]:
        """Everything our processes started, whatever its session: Flower's SuperExec runs
        each ServerApp and ClientApp in a session of its own, out of reach of a group signal."""
        found = []
        for started in self._started:
            try:
                found += psutil.Process(started.process.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                continue
        return found

    def down(self, grace: float = 15) -> None:
        """SIGTERM to every process group and every descendant, then SIGKILL for whatever
        outlives the grace period; returns once all of them are gone."""
        self._stop_watching.set()
        if self._watcher is not None:
            self._watcher.join()
        if self._trainer_watcher is not None:
            # Its handshake can wait on a trainer busy training a client (one connection at a
            # time): stopping the processes below ends that wait, so it is not waited for here.
            self._trainer_watcher.join(timeout=2)
        strays = self._descendants()
        for started in self._started:
            _signal_group(started.process, signal.SIGTERM)
        for stray in strays:
            with contextlib.suppress(psutil.NoSuchProcess):
                stray.terminate()
        deadline = time.monotonic() + grace
        for started in self._started:
            try:
                started.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(started.process, signal.SIGKILL)
            started.process.wait()
            started.log.close()
        _, survivors = psutil.wait_procs(strays, timeout=max(0.1, deadline - time.monotonic()))
        for stray in survivors:
            with contextlib.suppress(psutil.NoSuchProcess):
                stray.kill()
        psutil.wait_procs(survivors, timeout=5)
        self._started.clear()


def _signal_group(process: subprocess.Popen, sig: signal.Signals) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass
