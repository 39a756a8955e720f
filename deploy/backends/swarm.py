"""Runs the Swarm stack document (deploy/swarm.py) through the Docker SDK, on a swarm manager.

The stack document stays the one description: `docker stack deploy -c stack.yaml flowertune` and
`deploy up --engine swarm` create the same services. What the SDK adds: it labels the nodes for
placement, runs each service on the manager's image by its ID (every node holds the same bytes,
loaded from `docker save`, and Swarm pulls nothing it is given by ID), waits until every
long-running service's task runs (healthy, where it has a healthcheck), and labels what it
creates as `docker stack deploy` does, so `docker stack ps flowertune` works and `down` removes
exactly that.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from docker.errors import APIError, ImageNotFound, NotFound
from docker.types import (
    EndpointSpec,
    Healthcheck,
    Mount,
    NetworkAttachmentConfig,
    RestartPolicy,
    SecretReference,
)

from deploy.backends.docker import LABEL, VARIABLE, engine, nanoseconds
from deploy.errors import DeployError
from deploy.swarm import PLACEMENT_LABEL, STACK

STACK_LABEL = "com.docker.stack.namespace"  # what `docker stack` finds a stack's objects by
SERVICE_LABEL = "com.docker.stack.image"
STUCK = ("failed", "rejected")  # task states that Swarm retries; their message says why


@dataclass(frozen=True)
class SwarmNode:
    id: str
    hostname: str
    labels: Mapping[str, str]


def node_labels(nodes: Iterable[SwarmNode], hosts: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """(node id -> host, for the nodes to label) and the hosts no node stands for.

    A host is the node already labelled with it, else the node of that hostname, else, in a
    swarm of one node and a layout of one host, that node. Two nodes labelled alike are refused:
    Swarm would place the host's services on either.
    """
    nodes = list(nodes)
    updates, missing = {}, []
    hosts = list(hosts)
    for host in hosts:
        labelled = [n for n in nodes if n.labels.get(PLACEMENT_LABEL) == host]
        if len(labelled) > 1:
            names = ", ".join(n.hostname for n in labelled)
            raise DeployError(f"--host {host}: nodes {names} are all labelled {PLACEMENT_LABEL}={host}; keep one")
        if labelled:
            continue
        free = [n for n in nodes if PLACEMENT_LABEL not in n.labels and n.id not in updates]
        named = [n for n in free if n.hostname.lower() == host.lower()]
        alone = free if len(nodes) == 1 and len(hosts) == 1 else []
        if named or alone:
            updates[(named or alone)[0].id] = host
        else:
            missing.append(host)
    return updates, missing


class SwarmDeployment:
    def __init__(self, document: dict[str, Any], compose_dir: Path, env: dict[str, str]):
        self.document = document
        self.compose_dir = compose_dir.resolve()
        self.env = env
        self.client = engine()
        swarm = self.client.info().get("Swarm", {})
        if swarm.get("LocalNodeState") != "active" or not swarm.get("ControlAvailable"):
            raise DeployError(
                "--engine swarm: this Docker engine is not a swarm manager; run `docker swarm init` here and "
                "`docker swarm join` on the other hosts, or point DOCKER_HOST at a manager"
            )
        self.labels = {LABEL: STACK, STACK_LABEL: STACK}

    # --- placement ----------------------------------------------------------
    def label_nodes(self, hosts: list[str]) -> list[str]:
        """Labels the nodes it can tell (`node_labels`); returns the hosts it cannot."""
        nodes = {n.id: n for n in self.client.nodes.list()}
        found = [
            SwarmNode(i, n.attrs["Description"]["Hostname"], n.attrs["Spec"].get("Labels", {}))
            for i, n in nodes.items()
        ]
        updates, missing = node_labels(found, hosts)
        for node_id, host in updates.items():
            node = nodes[node_id]
            spec = node.attrs["Spec"]
            node.update({**spec, "Labels": {**spec.get("Labels", {}), PLACEMENT_LABEL: host}})
        return missing

    # --- up -----------------------------------------------------------------
    def up(self, timeout: float = 900) -> None:
        """A fresh stack: secrets cannot change in place, so what an earlier `up` left goes first."""
        self.down(volumes=False)
        network = self._network()
        secrets = {name: self._secret(name, spec) for name, spec in self.document.get("secrets", {}).items()}
        images = {tag: self._image_id(tag) for tag in {s["image"] for s in self.document["services"].values()}}
        for name, service in self.document["services"].items():
            self._create(name, service, network, secrets, images[service["image"]])
        self._wait_running(time.monotonic() + timeout)

    def _network(self) -> str:
        spec = self.document["networks"]["default"]
        name = f"{STACK}_default"
        self.client.networks.create(
            name, driver=spec["driver"], options=spec.get("driver_opts"), scope="swarm", labels=self.labels
        )
        return name

    def _secret(self, name: str, spec: dict[str, str]) -> Any:
        file = VARIABLE.sub(lambda m: self.env.get(m[1]) or m[2] or "", spec["file"])
        path = self.compose_dir / Path(file).expanduser()
        try:
            data = path.read_bytes()
        except OSError as err:
            raise DeployError(f"secret {name}: cannot read {path} ({err.strerror})") from None
        return self.client.secrets.create(name=f"{STACK}_{name}", data=data, labels=self.labels)

    def _image_id(self, tag: str) -> str:
        try:
            return self.client.images.get(tag).id
        except ImageNotFound:
            raise DeployError(
                f"image {tag}: not on this manager; load it on every node (`docker save` here, `docker load` there)"
            ) from None

    def _mounts(self, specs: list[str]) -> list[Mount]:
        """`name:/path`, a bind `./src:/path[:ro]`, or an anonymous volume `/path`."""
        mounts = []
        for spec in specs:
            source, _, rest = spec.partition(":") if ":" in spec else ("", "", spec)
            target, _, mode = rest.partition(":")
            if source.startswith((".", "/", "~")):
                path = str((self.compose_dir / Path(source).expanduser()).resolve())
                mounts.append(Mount(target, path, type="bind", read_only=mode == "ro"))
            else:
                volume = f"{STACK}_{source}" if source else ""
                mounts.append(Mount(target, volume, read_only=mode == "ro", labels=self.labels if source else None))
        return mounts

    def _create(self, name: str, service: dict[str, Any], network: str, secrets: dict[str, Any], image: str) -> None:
        deploy = service["deploy"]
        refs = [r if isinstance(r, dict) else {"source": r} for r in service.get("secrets", [])]
        kwargs: dict[str, Any] = {
            "name": f"{STACK}_{name}",
            "args": service["command"],
            "env": [f"{key}={value}" for key, value in service.get("environment", {}).items()],
            "mounts": self._mounts(service.get("volumes", [])),
            "secrets": [
                SecretReference(
                    secrets[r["source"]].id,
                    f"{STACK}_{r['source']}",
                    r.get("target"),
                    r.get("uid"),
                    r.get("gid"),
                    r.get("mode", 0o444),
                )
                for r in refs
            ],
            "constraints": deploy["placement"]["constraints"],
            "networks": [NetworkAttachmentConfig(network, aliases=[name])],
            "endpoint_spec": EndpointSpec(
                mode=deploy["endpoint_mode"],
                ports={p["published"]: (p["target"], p["protocol"], p["mode"]) for p in service.get("ports", [])},
            ),
            "restart_policy": RestartPolicy(
                condition=deploy["restart_policy"]["condition"], delay=nanoseconds(deploy["restart_policy"]["delay"])
            ),
            "user": service.get("user"),
            "init": service.get("init"),
            "read_only": service.get("read_only"),
            "cap_add": service.get("cap_add"),
            "cap_drop": service.get("cap_drop"),
            "hostname": name,
            "labels": {**self.labels, SERVICE_LABEL: service["image"]},
            "container_labels": {**self.labels, f"{LABEL}.service": name},
        }
        if "healthcheck" in service:
            check = service["healthcheck"]
            kwargs["healthcheck"] = Healthcheck(
                test=check["test"],
                interval=nanoseconds(check["interval"]),
                timeout=nanoseconds(check["timeout"]),
                retries=check["retries"],
                start_period=nanoseconds(check.get("start_period", "0s")),
            )
        self.client.services.create(image, **kwargs)

    def _wait_running(self, deadline: float) -> None:
        """Until each long-running service has a running task; one-shots are left to finish."""
        waiting = {
            s.name: s for s in self.services() if s.attrs["Spec"]["TaskTemplate"]["RestartPolicy"]["Condition"] == "any"
        }
        while waiting and time.monotonic() < deadline:
            for name, service in list(waiting.items()):
                if any(t["Status"]["State"] == "running" for t in service.tasks()):
                    del waiting[name]
            time.sleep(2)
        if waiting:
            why = "; ".join(f"{name}: {self._last_state(service)}" for name, service in sorted(waiting.items()))
            raise DeployError(f"services not running in time: {why}")

    # --- status, logs, down -------------------------------------------------
    def services(self) -> list[Any]:
        return self.client.services.list(filters={"label": f"{STACK_LABEL}={STACK}"})

    def status(self) -> list[tuple[str, str, str, str]]:
        """(service, topology host, node hostname, its latest task's state) per service."""
        nodes = {n.id: n.attrs for n in self.client.nodes.list()}
        rows = []
        for service in sorted(self.services(), key=lambda s: s.name):
            task = _latest(service.tasks())
            node = nodes.get(task.get("NodeID", ""), {}) if task else {}
            host = node.get("Spec", {}).get("Labels", {}).get(PLACEMENT_LABEL, "-")
            hostname = node.get("Description", {}).get("Hostname", "-")
            rows.append((service.name.removeprefix(f"{STACK}_"), host, hostname, self._last_state(service)))
        return rows

    def _last_state(self, service: Any) -> str:
        task = _latest(service.tasks())
        if not task:
            return "no task"
        status = task["Status"]
        return status["State"] + (f" ({status['Err']})" if status.get("Err") else "")

    def logs(self, service: str, tail: int = 100) -> str:
        try:
            found = self.client.services.get(f"{STACK}_{service}")
        except NotFound:
            raise DeployError(f"service {service}: not in the stack {STACK}") from None
        return b"".join(found.logs(stdout=True, stderr=True, tail=tail)).decode(errors="replace")

    def down(self, volumes: bool = True, timeout: float = 120) -> None:
        """Services first (Swarm stops their tasks on every node), then the secrets, the network
        and, on this engine, the volumes, each retried while a stopping task still holds it.
        Volumes on other nodes are theirs: Swarm has no way to remove them (docs/several-machines.md)."""
        for service in self.services():
            service.remove()
        deadline = time.monotonic() + timeout
        found = [
            *self.client.secrets.list(filters={"label": f"{STACK_LABEL}={STACK}"}),
            *self.client.networks.list(filters={"label": f"{STACK_LABEL}={STACK}"}),
            *(self.client.volumes.list(filters={"label": f"{STACK_LABEL}={STACK}"}) if volumes else []),
        ]
        for thing in found:
            while True:
                try:
                    thing.remove()
                    break
                except NotFound:
                    break
                except APIError as err:
                    if time.monotonic() > deadline:
                        raise DeployError(f"{thing.name} not removed in {timeout:.0f} s: {err.explanation}") from None
                    time.sleep(2)


def _latest(tasks: list[dict[str, Any]]) -> dict[str, Any] | None:
    return max(tasks, key=lambda t: t["CreatedAt"], default=None)
