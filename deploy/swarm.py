"""Renders a Topology as one Docker Swarm stack file, in compose's own schema (`docker stack deploy`).

The stack is made from deploy.compose's per-host documents, not beside them, so every command,
healthcheck and hardening setting is the one compose runs. Only what Swarm does differently
changes (docs/several-machines.md says why each):

- One stack for every host: each service is placed on the node labelled `flowertune.host == HOST`,
  and a host's own services (model-fetch, trainers) carry the host's name.
- Every service reaches the SuperLink by its service name on the stack's overlay network, so
  SuperNodes never leave it; only the SuperLink's port is published, on its own host, for `flwr`.
- Certificates and keys are Swarm secrets, mounted where compose binds their files, each service
  getting only its own: no folder of keys on any host, and no `setup` step left to run.
- Swarm has no `depends_on`: a service that starts before what it needs fails and is restarted by
  its restart policy until that answers (a one-shot only on failure; `submit` never, since a second
  submission would be a second run). A task with a healthcheck counts as running once healthy.
- Swarm ignores device reservations (docker/cli#3051, moby/swarmkit#1244): a GPU is pinned with
  NVIDIA_VISIBLE_DEVICES, which NVIDIA's runtime reads when it is the node's default runtime.
- Swarm mounts tmpfs `noexec`, and torch.compile loads the kernels it builds in /tmp: /tmp and
  $HOME are anonymous volumes instead, removed with each task's container.
- One replica per service, so a virtual IP buys nothing: DNS round robin (`dnsrr`) needs no IPVS
  in the kernel, and the published port uses `mode: host`, which needs no ingress network either.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from deploy import compose
from deploy.compose import HF_TOKEN, IMAGE_UID, RenderOptions
from deploy.errors import DeployError
from deploy.topology import LayoutError, Topology

STACK = compose.PROJECT  # `docker stack deploy -c stack.yaml flowertune`
STACK_FILE = "stack.yaml"
PLACEMENT_LABEL = "flowertune.host"
OVERLAYS = ("encrypted", "plain")  # plain: kernels without IPsec ESP; Flower's own TLS still holds
ONCE_PER_STACK = ("superlink", "register-nodes", "serverapp", "submit")  # the rest run on every host
RESULTS_VOLUME = "results"  # on the SuperLink's host: the ServerApp's folder has no path on the others
SECRET_MODE = 0o400  # every service runs as the images' user, who alone reads its secrets
RETRY = "5s"
# Swarm's restart policy for compose's `restart`; `submit` is the one-shot that must not repeat.
RESTART = {"unless-stopped": "any", "no": "on-failure"}
# Compose keys that Swarm lacks or takes in another form (`_service`). `security_opt` is not in
# Swarm's service spec: `"no-new-privileges": true` in each node's daemon.json sets it for all.
SWARM_FORM = frozenset(
    {"depends_on", "restart", "security_opt", "tmpfs", "ports", "deploy", "secrets", "volumes", "environment"}
)
NAME = re.compile(r"[A-Za-z0-9](?:[-_]*[A-Za-z0-9]+)*")  # a Swarm service name (no dots)


def render(
    topology: Topology, options: RenderOptions, hub_token: bool = False, overlay: str = "encrypted"
) -> dict[str, Any]:
    """The stack document. `hub_token`: the services that download get the Hugging Face token
    as the secret `hf_token`, read from ${HF_TOKEN_FILE} (Swarm refuses an empty secret, so
    there is none without a token: public and local models need none)."""
    if options.insecure:
        raise DeployError("--insecure: a Swarm stack spans machines and always runs TLS; leave --insecure out")
    if options.gpu_request != "nvidia":
        raise DeployError(
            f"--gpu-request {options.gpu_request}: Swarm services cannot request devices; use nvidia "
            "(NVIDIA_VISIBLE_DEVICES, with NVIDIA's runtime as each GPU node's default runtime)"
        )
    if overlay not in OVERLAYS:
        raise DeployError(f"--overlay {overlay!r}: expected one of {', '.join(OVERLAYS)}")
    inside = dataclasses.replace(topology, superlink_address="superlink")  # every host dials the service
    given = dataclasses.replace(options, tls_given=True, build_context=None)
    nodes = {node.name for node in topology.nodes}
    services: dict[str, Any] = {}
    secrets: dict[str, Any] = {HF_TOKEN: {"file": "${HF_TOKEN_FILE}"}} if hub_token else {}
    volumes: dict[str, Any] = {RESULTS_VOLUME: {}}
    for host, document in compose.render(inside, given).items():
        volumes.update(document["volumes"])
        for name, service in document["services"].items():
            if name != "setup":  # the secrets are its work, done by Swarm
                own = name in ONCE_PER_STACK or name in nodes
                services[name if own else f"{name}-{_service_suffix(host)}"] = _service(
                    name, service, host, options, hub_token, secrets
                )
    network = {"driver": "overlay", **({"driver_opts": {"encrypted": ""}} if overlay == "encrypted" else {})}
    return {"version": "3.8", "services": services, "networks": {"default": network}, "volumes": volumes} | (
        {"secrets": secrets} if secrets else {}
    )


def label_commands(hosts: Iterable[str]) -> list[str]:
    """What a swarm manager runs once per host, so that the placement constraints find its node."""
    return [f"docker node update --label-add {PLACEMENT_LABEL}={host} NODE" for host in hosts]


def _service_suffix(host: str) -> str:
    """Host names may hold dots (an IP); Swarm's service names may not."""
    suffix = host.replace(".", "-")
    if not NAME.fullmatch(suffix):
        raise LayoutError(f"--host {host!r}: Swarm service names take letters, digits and '-' only")
    return suffix


def _service(
    name: str, service: dict[str, Any], host: str, options: RenderOptions, hub_token: bool, secrets: dict[str, Any]
) -> dict[str, Any]:
    swarm = {key: value for key, value in service.items() if key not in SWARM_FORM}
    environment = dict(service.get("environment", {}))
    refs: list[Any] = [HF_TOKEN] if hub_token and HF_TOKEN in service.get("secrets", []) else []
    if not refs:
        environment.pop("HF_TOKEN_PATH", None)
    volumes = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):  # a given certificate or key (RenderOptions.tls_given): a secret
            secret = Path(volume["source"]).name
            secrets[secret] = {"file": volume["source"]}
            uid = str(IMAGE_UID)
            refs.append({"source": secret, "target": volume["target"], "uid": uid, "gid": uid, "mode": SECRET_MODE})
        elif volume.startswith(f"{options.results_dir}:"):
            volumes.append(f"{RESULTS_VOLUME}:{volume.partition(':')[2]}")
        else:
            volumes.append(volume)
    volumes += [mount.partition(":")[0] for mount in service.get("tmpfs", [])]  # anonymous volumes
    for device in service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", []):
        environment["NVIDIA_VISIBLE_DEVICES"] = ",".join(device["device_ids"])
    condition = "none" if name == "submit" else RESTART[service["restart"]]
    swarm |= {"environment": environment} if environment else {}
    swarm |= {"volumes": volumes, "secrets": refs} if refs else {"volumes": volumes}
    swarm["deploy"] = {
        "endpoint_mode": "dnsrr",
        "placement": {"constraints": [f"node.labels.{PLACEMENT_LABEL} == {host}"]},
        "restart_policy": {"condition": condition, "delay": RETRY},
    }
    if "ports" in service:
        ports = (port.split(":") for port in service["ports"])
        swarm["ports"] = [{"target": int(t), "published": int(p), "protocol": "tcp", "mode": "host"} for p, t in ports]
    return swarm
