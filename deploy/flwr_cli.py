"""Talks to a running SuperLink through Flower's own `flwr` CLI, as a user would.

Both backends use it: the readiness check (`flwr supernode ls`), run submission
(`flwr run . <connection>`), log streaming, stopping a run (`flwr stop`) and the final
status (`flwr ls`). Going through the CLI keeps us on Flower's supported surface and
proves the connection entry we register is the one users type.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import tomli_w
from flwr.common.config import unflatten_dict

from deploy.errors import DeployError
from deploy.progress import follow

# How often a followed run asks whether the processes it depends on are still up.
ALIVE_PERIOD = 1.0


def write_run_config(path: Path, run_config: Mapping[str, Any]) -> Path:
    """Overrides as a TOML file (`--run-config FILE.toml`), so paths with spaces or quotes survive."""
    path.write_text(tomli_w.dumps(unflatten_dict(dict(run_config))))
    return path


@dataclass(frozen=True)
class Connection:
    """One `[superlink.<name>]` entry of Flower's config file."""

    name: str
    address: str
    root_certificate: Path | None = None

    def entry(self) -> dict[str, Any]:
        if self.root_certificate is None:
            return {"address": self.address, "insecure": True}
        return {"address": self.address, "root-certificates": str(self.root_certificate.resolve())}


@dataclass(frozen=True)
class SimulationConnection:
    """A `[superlink.<name>]` entry for Flower's Simulation Engine: `flwr run` starts a local
    SuperLink (`:local:`) whose virtual SuperNodes run the ClientApp in Ray actors.

    The resources are per ClientApp, as the FlowerTune template gives them; the node count
    must be the app's partition count, since each virtual node's `num-partitions` is it.
    Flower 1.42 calls `options.` deprecated but still reads them, and they keep the whole
    setting in the one file we write.
    """

    name: str
    num_supernodes: int
    num_cpus: int
    num_gpus: float

    def entry(self) -> dict[str, Any]:
        resources = {"num-cpus": self.num_cpus, "num-gpus": self.num_gpus}
        return {
            "address": ":local:",
            "options": {"num-supernodes": self.num_supernodes, "backend": {"client-resources": resources}},
        }


def register_connection(flwr_home: Path, connection: Connection | SimulationConnection) -> Path:
    """Adds or replaces the entry in `$FLWR_HOME/config.toml`, keeping the user's others."""
    path = flwr_home / "config.toml"
    config = tomllib.loads(path.read_text()) if path.is_file() else {}
    superlink = config.setdefault("superlink", {})
    superlink[connection.name] = connection.entry()
    superlink.setdefault("default", connection.name)
    flwr_home.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(config))
    return path


def local_superlink_env(env: Mapping[str, str], flwr_home: Path, bin_dir: Path) -> dict[str, str]:
    """`env` for a `flwr` whose `:local:` connection starts a SuperLink of its own: its own
    FLWR_HOME and free ports (Flower's defaults, 39091 and 39093, are one per machine), the
    venv's bin first on PATH (`flwr` starts `flower-superlink` by name), and no runtime
    dependency installation (the venv has every dependency; `uv sync` would need the network
    and install torch afresh for every run)."""
    from deploy.backends.process import free_ports  # it imports this module

    http_port, control_port = free_ports(2)
    return {
        **env,
        "FLWR_HOME": str(flwr_home),
        "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }


def stop_local_superlink(flwr_home: Path) -> None:
    """Stops the SuperLink `flwr` started for a `:local:` connection of this FLWR_HOME, and what
    it started in turn (the simulation, Ray). `flwr` starts it detached and leaves it running
    after the run; it is found by its log file, which lies in this FLWR_HOME only."""
    log_file = str(flwr_home / "local-superlink" / "superlink.log")
    for process in psutil.process_iter(["cmdline"]):
        if log_file in (process.info["cmdline"] or []):
            family = [*process.children(recursive=True), process]
            for member in family:
                with contextlib.suppress(psutil.NoSuchProcess):  # one that ended on its own meanwhile
                    member.terminate()
            _, alive = psutil.wait_procs(family, timeout=10)
            for member in alive:
                with contextlib.suppress(psutil.NoSuchProcess):
                    member.kill()


@dataclass
class FlwrCli:
    flwr: Path
    flwr_home: Path
    connection: str
    env: Mapping[str, str]

    def _run(self, *args: str, cwd: Path | None = None, capture: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.flwr), *args],
            cwd=cwd,
            env={**self.env, "FLWR_HOME": str(self.flwr_home)},
            capture_output=capture,
            text=True,
        )

    def ask(self, *args: str, cwd: Path | None = None) -> dict[str, Any] | None:
        """A `flwr` command's JSON reply; None when it gives none (no SuperLink answering)."""
        done = self._run(*args, "--format", "json", cwd=cwd)
        try:
            return json.loads(done.stdout)
        except json.JSONDecodeError:
            return None

    def nodes(self) -> list[dict[str, Any]] | None:
        """Every node the SuperLink knows, whatever its state; None while it does not answer."""
        reply = self.ask("supernode", "ls", self.connection)
        if not reply or not reply.get("success"):
            return None
        return reply["nodes"]

    def online_nodes(self) -> int | None:
        """None while the SuperLink does not answer yet."""
        nodes = self.nodes()
        return None if nodes is None else sum(1 for node in nodes if node["status"] == "online")

    def wait_for_nodes(self, expected: int, timeout: float, alive: Callable[[], None]) -> None:
        """Polls the SuperLink's own node list; `alive` raises if a process we started died.

        With `expected` 0 it returns as soon as the SuperLink answers at all.
        """
        deadline = time.monotonic() + timeout
        online = None
        while time.monotonic() < deadline:
            alive()
            online = self.online_nodes()
            if online is not None and online >= expected:
                return
            time.sleep(1)
        raise DeployError(f"only {online or 0} of {expected} SuperNodes online after {timeout:.0f} s")

    def register_node(self, public_key: Path) -> None:
        """Idempotent: a key the SuperLink already knows counts as registered."""
        reply = self.ask("supernode", "register", str(public_key), self.connection)
        reason = " ".join(str((reply or {}).get("error-message", "no answer")).split())
        if not (reply and reply.get("success")) and "already in use" not in reason:
            raise DeployError(f"registering {public_key.name} failed: {reason}")

    def submit(self, app_dir: Path, run_config: Mapping[str, Any], scratch: Path) -> str:
        overrides = write_run_config(scratch / "run-config.toml", run_config)
        reply = self.ask("run", str(app_dir), self.connection, "--run-config", str(overrides), cwd=app_dir)
        if not reply or not reply.get("success"):
            reason = (reply or {}).get("error-message", "no answer from flwr run")
            raise DeployError(f"flwr run failed: {' '.join(str(reason).split())}")
        return str(reply["run-id"])

    def stream_logs(self, run_id: str, alive: Callable[[], None] = lambda: None) -> None:
        """Blocks until the run finishes, showing the ServerApp's log as it goes (`deploy.progress`).

        `alive` is asked every ALIVE_PERIOD seconds meanwhile: once it raises (a trainer that
        could not load its model), the run is stopped, the stream ended and its error raised,
        instead of the rounds waiting out their timeout for clients that cannot train.
        """
        failed: list[DeployError] = []
        done = threading.Event()
        with subprocess.Popen(
            [str(self.flwr), "log", run_id, self.connection, "--stream"],
            env={**self.env, "FLWR_HOME": str(self.flwr_home)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        ) as streamed:

            def watch() -> None:
                while not done.wait(ALIVE_PERIOD):
                    try:
                        alive()
                    except Exception as died:  # whatever it is, the run must not go on unwatched
                        failed.append(died if isinstance(died, DeployError) else DeployError(str(died)))
                        try:
                            self.stop(run_id)
                        finally:
                            streamed.terminate()  # whether or not the SuperLink could take the stop
                        return

            watcher = threading.Thread(target=watch, name="run-alive-watch", daemon=True)
            watcher.start()
            try:
                follow(streamed.stdout)
            finally:
                done.set()
                watcher.join()
        if failed:
            raise failed[0]

    def stop(self, run_id: str) -> None:
        """Asks the SuperLink to stop the run, so that its ServerApp ends and its status says so.
        Its answer is not checked: callers stop the processes themselves next, and a SuperLink
        that is gone has no run left to stop."""
        self.ask("stop", run_id, self.connection)

    def log(self, run_id: str) -> str:
        """The ServerApp's log so far, at once."""
        return self._run("log", run_id, self.connection, "--show").stdout

    def run_record(self, run_id: str) -> dict[str, Any] | None:
        """`flwr ls --run-id`'s entry, or None: a SuperLink that is still starting or already
        gone answers without one, and callers must tell that from a run's own status."""
        reply = self.ask("ls", self.connection, "--run-id", run_id)
        if not reply or not reply.get("success") or not reply.get("runs"):
            return None
        return reply["runs"][0]

    def status(self, run_id: str) -> tuple[str, str]:
        run = self.run_record(run_id)
        if run is None:
            return "unknown", "flwr ls gave no answer"
        return run["status"], run.get("status-details", "")

    def run_to_completion(
        self, app_dir: Path, run_config: Mapping[str, Any], scratch: Path, alive: Callable[[], None] = lambda: None
    ) -> str:
        """Submits, then `watch_run`."""
        return self.watch_run(self.submit(app_dir, run_config, scratch), alive)

    def watch_run(self, run_id: str, alive: Callable[[], None]) -> str:
        """Streams the ServerApp log (`stream_logs`, which asks `alive` as it goes) and returns
        the run's final status. The stream also ends when the SuperLink dies; `alive` then
        raises, naming it."""
        print(f"Run {run_id} submitted; streaming the ServerApp log.", flush=True)
        self.stream_logs(run_id, alive)
        alive()
        status, details = self.wait_finished(run_id, timeout=60)
        print(f"Run {run_id}: {status} {details}".rstrip(), flush=True)
        return status

    def wait_finished(self, run_id: str, timeout: float, alive: Callable[[], None] = lambda: None) -> tuple[str, str]:
        """`flwr log --stream` can return a moment before the status flips to finished. A caller
        that waits here without streaming passes `alive`, which raises once a process the run
        needs has died (a trainer that could not load), rather than after the rounds' timeouts."""
        deadline = time.monotonic() + timeout
        status, details = self.status(run_id)
        while not status.startswith("finished") and time.monotonic() < deadline:
            alive()
            time.sleep(1)
            status, details = self.status(run_id)
        return status, details
