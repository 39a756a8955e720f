"""Starts one host's rendered compose document through the Docker SDK.

The compose document (deploy/compose.py) is the single description of the stack; this
backend reads it, so `docker compose up` and `deploy up` run the same containers. What
the SDK adds: it waits on real health checks and on the SuperLink's own node list, and
it labels everything it creates, so `down` removes exactly that and nothing else.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

from docker.errors import DockerException, NotFound
from docker.types import DeviceRequest

import docker
from deploy.compose import IMAGE_UID, PROJECT
from deploy.errors import DeployError

LABEL = "flowertune-deploy.project"
# The compose keys this backend translates; any other key would be silently lost, so it fails.
# `build` is compose's own way to the images; `deploy up` builds them itself (deploy/images.py).
HANDLED_KEYS = frozenset(
    {
        "image",
        "build",
        "command",
        "environment",
        "volumes",
        "restart",
        "init",
        "user",
        "ports",
        "healthcheck",
        "deploy",
        "depends_on",
        "cap_drop",
        "cap_add",
        "security_opt",
        "read_only",
        "tmpfs",
        "secrets",
    }
)
# Compose's `${VAR:-default}`: the document names a variable of the user's shell, never its value.
# What a log says went wrong, most telling first: our own one-line refusal (`error: ...`),
# an exception (`FileNotFoundError: ...`), a logged error (`... ERROR trainer gpu0-0 died ...`).
ERROR_LINES = (re.compile(r"^error: "), re.compile(r"^\w*(Error|Exception): "), re.compile(r"\bERROR\b"))
VARIABLE = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def engine() -> docker.DockerClient:
    """The local engine, or one line that says none answers (not the SDK's traceback)."""
    try:
        client = docker.from_env()
        client.ping()
    except DockerException as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DeployError(
            f"no Docker engine answers ({reason}); start one (`sudo dockerd &` or `systemctl start docker`), "
            "or use `deploy up --backend process --insecure`"
        ) from None
    return client


def nanoseconds(text: str) -> int:
    """Compose's durations ("5s") as the Engine API takes them."""
    return int(float(text.rstrip("s")) * 1e9)


class DockerDeployment:
    def __init__(self, document: dict[str, Any], compose_dir: Path, env: dict[str, str]):
        self.document = document
        self.compose_dir = compose_dir.resolve()
        self.env = env
        self.client = engine()
        self.project = document.get("name", PROJECT)
        self.network_name = f"{self.project}_default"

    # --- up -----------------------------------------------------------------
    def up(self, timeout: float = 600, skip: frozenset[str] = frozenset()) -> None:
        """Start services in dependency order, waiting on each dependency's condition."""
        self._network()
        for name in self.document.get("volumes", {}):
            self._volume(name)
        started: set[str] = set()
        services = {n: s for n, s in self.document["services"].items() if n not in skip}
        deadline = time.monotonic() + timeout
        while len(started) < len(services):
            ready = [
                n
                for n, s in services.items()
                if n not in started and all(d in started for d in s.get("depends_on", {}))
            ]
            if not ready:
                raise DeployError(f"services with unmet dependencies: {sorted(set(services) - started)}")
            for name in ready:
                for dep, cond in services[name].get("depends_on", {}).items():
                    self._wait(dep, cond["condition"], deadline)
                self._run(name, services[name])
                started.add(name)

    def _network(self) -> None:
        if not self.client.networks.list(names=[self.network_name]):
            self.client.networks.create(self.network_name, driver="bridge", labels={LABEL: self.project})

    def _volume(self, name: str) -> None:
        full = f"{self.project}_{name}"
        try:
            self.client.volumes.get(full)
        except NotFound:
            self.client.volumes.create(full, labels={LABEL: self.project})

    def _mounts(self, specs: list[str]) -> dict[str, dict[str, str]]:
        volumes = {}
        for spec in specs:
            source, target, *mode = spec.split(":")
            if source.startswith((".", "/", "~")):
                path = (self.compose_dir / Path(source).expanduser()).resolve()
                if not path.exists():  # as compose does: a missing bind source becomes a folder
                    path.mkdir(parents=True)
                source = str(path)
            else:
                source = f"{self.project}_{source}"
            volumes[source] = {"bind": target, "mode": mode[0] if mode else "rw"}
        return volumes

    def _secrets(self, names: list[str]) -> dict[str, dict[str, str]]:
        """As compose runs secrets without swarm: each one's file, bound read-only at
        /run/secrets/<name>; its value never enters the container's configuration."""
        mounts = {}
        for name in names:
            file = VARIABLE.sub(lambda m: self.env.get(m[1]) or m[2] or "", self.document["secrets"][name]["file"])
            path = self.compose_dir / Path(file).expanduser()
            if not path.exists():  # compose refuses it too; a folder made in its place would hide the mistake
                raise DeployError(f"secret {name}: no such file {path}")
            mounts[str(path)] = {"bind": f"/run/secrets/{name}", "mode": "ro"}
        return mounts

    def _run(self, name: str, service: dict[str, Any]) -> None:
        unknown = sorted(set(service) - HANDLED_KEYS)
        if unknown:
            raise DeployError(f"service {name}: compose keys {unknown} are not supported by the Docker SDK backend")
        container_name = f"{self.project}-{name}"
        try:
            self.client.containers.get(container_name).remove(force=True)
        except NotFound:
            pass
        kwargs: dict[str, Any] = {
            "image": service["image"],
            "command": service["command"],
            "name": container_name,
            "hostname": name,
            "detach": True,
            "labels": {LABEL: self.project, f"{LABEL}.service": name},
            "environment": {key: str(value) for key, value in service.get("environment", {}).items()},
            "volumes": {**self._mounts(service.get("volumes", [])), **self._secrets(service.get("secrets", []))},
            "network": self.network_name,
            "init": service.get("init", False),
            "cap_drop": service.get("cap_drop"),
            "cap_add": service.get("cap_add"),
            "security_opt": service.get("security_opt"),
            "read_only": service.get("read_only", False),
            "tmpfs": {path: options for path, _, options in (t.partition(":") for t in service.get("tmpfs", []))},
        }
        if "user" in service:
            kwargs["user"] = service["user"]
        restart = service.get("restart", "no")
        if restart != "no":
            kwargs["restart_policy"] = {"Name": restart}
        if "ports" in service:
            kwargs["ports"] = {f"{p.split(':')[1]}/tcp": int(p.split(":")[0]) for p in service["ports"]}
        if "healthcheck" in service:
            hc = service["healthcheck"]
            kwargs["healthcheck"] = {
                "test": hc["test"],
                "interval": nanoseconds(hc["interval"]),
                "timeout": nanoseconds(hc["timeout"]),
                "retries": hc["retries"],
                "start_period": nanoseconds(hc.get("start_period", "0s")),
            }
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        if devices:
            kwargs["device_requests"] = [
                DeviceRequest(driver=d["driver"], device_ids=d["device_ids"], capabilities=[d["capabilities"]])
                for d in devices
            ]
        container = self.client.containers.create(**kwargs)
        # The service name must resolve on the network, as it does under compose.
        self.client.networks.get(self.network_name).disconnect(container)
        self.client.networks.get(self.network_name).connect(container, aliases=[name])
        container.start()

    def _wait(self, service: str, condition: str, deadline: float) -> None:
        container = self.client.containers.get(f"{self.project}-{service}")
        while time.monotonic() < deadline:
            container.reload()
            state = container.attrs["State"]
            if condition == "service_healthy":
                health = state.get("Health", {}).get("Status")
                if health == "healthy":
                    return
                # A service that dies before it is healthy restarts forever under its policy
                # while compose and we would wait out the whole start period.
                if health == "unhealthy" or container.attrs.get("RestartCount", 0) > 0 or state["Status"] == "exited":
                    raise DeployError(f"{service} did not become healthy: {_last_error(container)}")
            if condition == "service_completed_successfully" and state["Status"] == "exited":
                if state["ExitCode"] == 0:
                    return
                raise DeployError(f"{service} exited with code {state['ExitCode']}: {_last_error(container)}")
            if condition == "service_started" and state["Running"]:
                return
            time.sleep(1)
        raise DeployError(f"{service} not {condition.removeprefix('service_')} in time")

    # --- status, logs, down -------------------------------------------------
    def containers(self) -> list[Any]:
        return self.client.containers.list(all=True, filters={"label": f"{LABEL}={self.project}"})

    def status(self) -> list[tuple[str, str, str]]:
        rows = []
        for c in sorted(self.containers(), key=lambda c: c.name):
            health = c.attrs["State"].get("Health", {}).get("Status", "-")
            rows.append((c.labels.get(f"{LABEL}.service", c.name), c.status, health))
        return rows

    def logs(self, service: str, tail: int = 100) -> str:
        return self.client.containers.get(f"{self.project}-{service}").logs(tail=tail).decode(errors="replace")

    def down(self, volumes: bool = True) -> None:
        for c in self.containers():
            c.remove(force=True)
        for n in self.client.networks.list(filters={"label": f"{LABEL}={self.project}"}):
            n.remove()
        if volumes:
            for v in self.client.volumes.list(filters={"label": f"{LABEL}={self.project}"}):
                v.remove(force=True)


def _last_error(container: Any) -> str:
    """The line of its log that says why (see ERROR_LINES), else its last line."""
    lines = [line.strip() for line in container.logs(tail=200).decode(errors="replace").splitlines()] or [""]
    for pattern in ERROR_LINES:
        found = [line for line in lines if pattern.search(line)]
        if found:
            return found[-1]
    return lines[-1]


def prepare_host_folder(path: Path) -> None:
    """Bind-mounted folders must be writable by the images' non-root user."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        for p in [path, *path.rglob("*")]:
            os.chown(p, IMAGE_UID, IMAGE_UID)
