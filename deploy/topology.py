"""Where each SuperNode runs: its partition, its machine and its GPU.

Backends (plain processes, Docker Compose) only read a `Topology`; none of them decides
the layout, so every backend runs the same federation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

DEFAULT_PORT = 8000  # Flower 1.42 serves Fleet, Control and Runtime APIs on this one port


class LayoutError(ValueError):
    """A layout request that cannot be honoured; the message is one line."""


@dataclass(frozen=True)
class Host:
    """A machine and the GPU ids it lends to SuperNodes; no GPUs means CPU-only nodes."""

    name: str
    gpus: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str) -> "Host":
        """`NAME` or `NAME=0,1,3` (GPU ids), as typed on the command line."""
        name, _, gpus = text.partition("=")
        if not name.strip():
            raise LayoutError(f"--host {text!r}: expected NAME or NAME=GPU,GPU,...")
        return cls(name.strip(), parse_gpus(gpus) if gpus.strip() else ())


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
    def node_config(self) -> str:
        return f"partition-id={self.partition_id} num-partitions={self.num_partitions}"


@dataclass(frozen=True)
class Topology:
    """The first host also runs the SuperLink (and the ServerApp)."""

    hosts: tuple[Host, ...]
    nodes: tuple[Node, ...]
    superlink_address: str
    superlink_port: int = DEFAULT_PORT

    @property
    def superlink_host(self) -> str:
        return self.hosts[0].name

    def nodes_on(self, host: str) -> tuple[Node, ...]:
        return tuple(n for n in self.nodes if n.host == host)

    def table(self) -> str:
        rows = [("node", "partition", "host", "gpu")]
        rows += [(n.name, str(n.partition_id), n.host, "cpu" if n.gpu is None else str(n.gpu)) for n in self.nodes]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def parse_gpus(text: str) -> tuple[int, ...]:
    try:
        gpus = tuple(int(g) for g in text.split(",") if g.strip())
    except ValueError:
        raise LayoutError(f"--gpus {text!r}: expected GPU ids such as 0,1,2,3") from None
    if any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
        raise LayoutError(f"--gpus {text!r}: GPU ids must be distinct integers >= 0")
    return gpus


def plan(
    num_nodes: int,
    hosts: Sequence[Host],
    superlink_address: str | None = None,
    superlink_port: int = DEFAULT_PORT,
) -> Topology:
    """Node i takes slot i mod S, slots being every (host, GPU) pair in order.

    With one host of G GPUs that puts node i on GPU i mod G; a host without GPUs offers
    one CPU slot. The SuperLink address defaults to the first host's name.
    """
    if num_nodes < 1:
        raise LayoutError(f"number of nodes = {num_nodes}: must be at least 1")
    if not hosts:
        raise LayoutError("no hosts: name at least one")
    names = [h.name for h in hosts]
    if len(set(names)) != len(names):
        raise LayoutError(f"hosts {names}: names must be distinct")
    slots = [(h.name, g) for h in hosts for g in (h.gpus or (None,))]
    nodes = tuple(Node(i, num_nodes, *slots[i % len(slots)]) for i in range(num_nodes))
    return Topology(tuple(hosts), nodes, superlink_address or hosts[0].name, superlink_port)
