"""The ServerApp's Grid, answering a round as soon as its replies are in.

Flower's deployment Grid looks for replies every 3 s, so each round ends up to 3 s after
its last reply; with warm trainers that was a sizeable share of a ~20 s round. This
wrapper keeps Flower's own push and pull calls and only looks more often. It also
remembers where each message went: the SuperLink answers for a node that went offline
with an error reply from itself (node id 1), and the round must name the node.

A node whose own settings are wrong (a SuperNode started by hand with a partition id out
of range, say) fails every round it is sampled in, the same way; after its first such
reply the Grid no longer offers it for sampling, and says so once. Nor does it offer a
node that repeats another online node's partition (`app.partition_owners`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import WARNING

from flwr.app import Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from app.config import NodeConfigError
from app.partition_owners import PartitionOwners

POLL_SECONDS = 0.25


class PromptGrid(Grid):
    def __init__(self, grid: Grid, poll_seconds: float = POLL_SECONDS):
        self._grid = grid
        self._poll = poll_seconds
        self._destinations: dict[str, int] = {}  # the last send's message ids and their nodes
        self.left_out: set[int] = set()  # nodes whose node config cannot work
        self.owners = PartitionOwners()

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        online = self.online()
        held_back = self.owners.held_back(online)
        return [node for node in online if node not in self.left_out and node not in held_back]

    def online(self) -> list[int]:
        """Every node the SuperLink counts as online, whatever its settings."""
        return list(self._grid.get_node_ids())

    def claim(self, node: int, partition: int) -> int | None:
        """The other online node that already trains `partition`, or None once `node` does."""
        owner = self.owners.claim(node, partition, self.online())
        if owner is not None:
            log(
                WARNING,
                "Node %d repeats partition %d of node %d: held back from sampling while node %d is online",
                node,
                partition,
                owner,
                owner,
            )
        return owner

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Flower's contract: every reply, or those in by `timeout` seconds."""
        messages = list(messages)
        ids = list(self.push_messages(messages))
        self._destinations = dict(zip(ids, (m.metadata.dst_node_id for m in messages)))
        waiting = set(ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting:
            got = list(self.pull_messages(waiting))
            replies += got
            waiting -= {m.metadata.reply_to_message_id for m in got}
            if not waiting or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self._poll)
        for reply in replies:
            self._leave_out_if_misconfigured(reply)
        return replies

    def _leave_out_if_misconfigured(self, reply: Message) -> None:
        # Flower's error reason for a ClientApp exception names the exception's class.
        if reply.has_error() and NodeConfigError.__name__ in reply.error.reason:
            node = self.node_of(reply)
            if node not in self.left_out:
                log(WARNING, "Node %d is left out of sampling from now on: %s", node, reply.error.reason)
                self.left_out.add(node)

    def node_of(self, reply: Message) -> int:
        """The node a reply answers for: the one its message was sent to."""
        return self._destinations.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def wait_for_nodes(self, count: int, timeout: float) -> int:
        """Up to `timeout` s for `count` nodes to be online; returns how many are."""
        deadline = time.monotonic() + timeout
        while len(online := list(self.get_node_ids())) < count and time.monotonic() < deadline:
            time.sleep(1.0)
        return len(online)
