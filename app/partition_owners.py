"""Which node trains which partition, so that no partition's rows count twice.

The deploy tool never gives two nodes one partition, but SuperNodes started by hand, or
`deploy up` run on two machines with different host lists, can. A node's partition is
only known from its first reply. The first node to answer for a partition owns it for as
long as it stays online and does not fail; another node that answers for it meanwhile is
a repeat: its update is rejected and it is held back from sampling. A node that failed
gives its partition up, so the same site restarted under a new node id (Flower keeps a
dead id online for up to two missed heartbeats) trains it again at once.
"""

from __future__ import annotations

from collections.abc import Collection


class PartitionOwners:
    def __init__(self) -> None:
        self._owner: dict[int, int] = {}  # partition id -> node
        self._repeats: dict[int, int] = {}  # node -> the partition it repeats

    def claim(self, node: int, partition: int, online: Collection[int]) -> int | None:
        """The other online node that owns `partition`, or None once `node` owns it."""
        if (owner := self._other_online_owner(node, partition, online)) is not None:
            self._repeats[node] = partition
            return owner
        self._owner[partition] = node
        self._repeats.pop(node, None)
        return None

    def release(self, node: int) -> None:
        """A node that failed owns nothing; the next to answer for its partition does."""
        self._owner = {p: n for p, n in self._owner.items() if n != node}

    def held_back(self, online: Collection[int]) -> set[int]:
        """Repeats whose partition's owner is still online: sampling them would be wasted."""
        return {
            node
            for node, partition in self._repeats.items()
            if self._other_online_owner(node, partition, online) is not None
        }

    def _other_online_owner(self, node: int, partition: int, online: Collection[int]) -> int | None:
        owner = self._owner.get(partition)
        return owner if owner is not None and owner != node and owner in online else None
