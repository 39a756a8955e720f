"""Where each SuperNode runs: its partition, its machine and its GPU.

Backends (plain processes, Docker Compose) only read a `Topology`; none of them decides
the layout, so every backend runs the same federation.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from app.trainer_protocol import trainer_home

DEFAULT_PORT = 8000  # Flower 1.42 serves Fleet, Control and Runtime APIs on this one port
# Flower's own setting: a SuperNode's SuperExec looks for a new message to run every 1 s by
# default; a round with a warm trainer is short enough that the wait shows.
SUPERNODE_ENV = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}


class LayoutError(ValueError):
    """A layout request that cannot be honoured; the message is one line."""


def _address(text: str) -> str:
    """A host name, an IPv4 address, or an IPv6 address bare or in brackets (kept bare: the
    certificate names it so, and `superlink_endpoint` adds the brackets a dialler needs)."""
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        if ipaddress.ip_address(bare).version == 6:
            return bare
    except ValueError:
        pass
    if HOSTNAME.fullmatch(text):
        return text
    raise LayoutError(
        f"--superlink-address {text!r}: expected a host name, an IPv4 address or an IPv6 address "
        "(bare or in [...]), without a port (the port is --port)"
    )


# A DNS name or an IPv4 address: it becomes a compose file name, a certificate name and an address.
HOSTNAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


@dataclass(frozen=True)
class Host:
    """A machine and the GPU ids it lends to SuperNodes; no GPUs means CPU-only nodes.

    `supernodes` False: a server host (`--server-host`), the SuperLink's and the ServerApp's
    alone, as a site that hosts the federation without training in it.
    """

    name: str
    gpus: tuple[int, ...] = ()
    supernodes: bool = True

    @classmethod
    def parse(cls, text: str) -> Host:
        """`NAME` or `NAME=0,1,3` (GPU ids), as typed on the command line."""
        name, _, gpus = text.partition("=")
        if not HOSTNAME.fullmatch(name.strip()):
            raise LayoutError(
                f"--host {text!r}: expected NAME or NAME=GPU,GPU,..., NAME a host name or IP "
                "(letters, digits, '.', '-'; it names compose files and certificates)"
            )
        return cls(name.strip(), parse_gpus(gpus, f"--host {text!r}") if gpus.strip() else ())

    @classmethod
    def server(cls, text: str) -> Host:
        """`--server-host NAME`: no GPU list, since no SuperNode runs there."""
        if not HOSTNAME.fullmatch(text):
            raise LayoutError(f"--server-host {text!r}: expected a host name or IP (letters, digits, '.', '-')")
        return cls(text, (), supernodes=False)


@dataclass(frozen=True)
class Node:
    partition_id: int
    num_partitions: int
    host: str
    gpu: int | None

    @property
    def name(self) -> str:
        return f"supernode-{self.partition_id}"

    @property
    def trainer_home(self) -> str:
        return trainer_home(self.gpu)

    @property
    def node_config(self) -> str:
        return f"partition-id={self.partition_id} num-partitions={self.num_partitions}"


@dataclass(frozen=True)
class TrainerGroup:
    """The warm trainers of one GPU of a host (or of a CPU-only host)."""

    host: str
    gpu: int | None
    count: int

    @property
    def home(self) -> str:
        return trainer_home(self.gpu)

    @property
    def name(self) -> str:
        return f"trainer-{self.home}"


@dataclass(frozen=True)
class Topology:
    """The first host also runs the SuperLink (and the ServerApp).

    No trainer groups: every ClientApp trains in its own process (and pays for loading).
    """

    hosts: tuple[Host, ...]
    nodes: tuple[Node, ...]
    superlink_address: str
    superlink_port: int = DEFAULT_PORT
    trainers: tuple[TrainerGroup, ...] = ()

    @property
    def superlink_host(self) -> str:
        return self.hosts[0].name

    @property
    def superlink_endpoint(self) -> str:
        """What other hosts dial: `host:port`, or `[v6]:port` for an IPv6 address."""
        address = self.superlink_address
        return f"[{address}]:{self.superlink_port}" if ":" in address else f"{address}:{self.superlink_port}"

    def nodes_on(self, host: str) -> tuple[Node, ...]:
        return tuple(n for n in self.nodes if n.host == host)

    def trainers_on(self, host: str) -> tuple[TrainerGroup, ...]:
        return tuple(t for t in self.trainers if t.host == host)

    def trainer_of(self, node: Node) -> TrainerGroup | None:
        return next((t for t in self.trainers if (t.host, t.gpu) == (node.host, node.gpu)), None)

    def table(self) -> str:
        rows = [("node", "partition", "host", "gpu", "trainer")]
        for n in self.nodes:
            group = self.trainer_of(n)
            trainer = f"{group.name} (x{group.count})" if group else "in process"
            rows.append((n.name, str(n.partition_id), n.host, "cpu" if n.gpu is None else str(n.gpu), trainer))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def parse_gpus(text: str, setting: str | None = None) -> tuple[int, ...]:
    """`setting`: what a refusal names, the --host value the ids came in (default: --gpus)."""
    if not text.strip():
        return ()
    setting = setting or f"--gpus {text!r}"
    try:
        gpus = tuple(int(g) for g in text.split(","))
    except ValueError:
        raise LayoutError(f"{setting}: expected GPU ids such as 0,1,2,3 (or '' for the CPU)") from None
    if any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
        raise LayoutError(f"{setting}: GPU ids must be distinct integers >= 0")
    return gpus


def trainers_per_gpu(host: Host, nodes_per_round: int, configured: int | None) -> int:
    """`configured` wins (0: no trainers); by default enough that a round's sampled nodes
    each find a free trainer on their host, spread over its GPUs; one on a CPU-only host,
    whose cores one training already keeps busy."""
    if configured is not None:
        return configured
    return math.ceil(nodes_per_round / len(host.gpus)) if host.gpus else 1


def plan(
    num_nodes: int,
    hosts: Sequence[Host],
    superlink_address: str | None = None,
    superlink_port: int = DEFAULT_PORT,
    nodes_per_round: int = 1,
    trainers: int | None = None,
) -> Topology:
    """Node i takes slot i mod S, slots being every (host, GPU) pair in order.

    With one host of G GPUs that puts node i on GPU i mod G; a host without GPUs offers
    one CPU slot. The SuperLink address defaults to the first host's name. Each slot gets
    `trainers_per_gpu` warm trainers (`trainers`: per GPU, None for the default).
    """
    if trainers is not None and trainers < 0:
        raise LayoutError(f"--trainers-per-gpu {trainers}: must be 0 (train inside each ClientApp) or more")
    if num_nodes < 1:
        raise LayoutError(f"number of nodes = {num_nodes}: must be at least 1")
    if not hosts:
        raise LayoutError("no hosts: name at least one")
    names = [h.name for h in hosts]
    if len({n.lower() for n in names}) != len(names):
        raise LayoutError(f"hosts {names}: names must be distinct (host names are case-insensitive)")
    slots = [(h.name, g) for h in hosts if h.supernodes for g in (h.gpus or (None,))]
    if not slots:
        raise LayoutError("--server-host: the other --host machines run the SuperNodes; name at least one")
    nodes = tuple(Node(i, num_nodes, *slots[i % len(slots)]) for i in range(num_nodes))
    groups = tuple(
        TrainerGroup(h.name, g, count)
        for h in hosts
        if h.supernodes and (count := trainers_per_gpu(h, nodes_per_round, trainers))
        for g in (h.gpus or (None,))
    )
    if superlink_address is not None:
        superlink_address = _address(superlink_address)
    return Topology(tuple(hosts), nodes, superlink_address or hosts[0].name, superlink_port, groups)
