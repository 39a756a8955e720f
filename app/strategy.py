"""Flower's FedAvg, made safe for LoRA updates and able to aggregate with FlexLoRA.

Flower's own consistency check raises, and so ends the whole run, when one reply's
keys differ; and it lets NaN tensors through. Here each reply is checked on its own
against the global adapter: a bad one is rejected and logged, the rest aggregated.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from app.aggregation import fedavg, flexlora
from app.grid import PromptGrid
from app.wire import WireError, pack, packed_bytes, unpack

WEIGHT_KEY = "num-examples"
REQUIRED_METRICS = ("train-loss", "train-seconds", "train-tokens", "peak-gpu-bytes")


@dataclass(frozen=True)
class RoundReport:
    """What one round did, for the metrics file: nothing about a round goes unrecorded."""

    server_round: int
    arrays: ArrayRecord | None
    clients: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    aggregate: dict[str, Any] = field(default_factory=dict)
    aggregate_seconds: float = 0.0


class FedAvgOrFlexLora(FedAvg):
    """Flower's FedAvg round logic; the arithmetic is ours (`app.aggregation`), FedAvg or FlexLoRA."""

    def __init__(
        self,
        *,
        use_flexlora: bool,
        lora_rank: int,
        flexlora_split: str,
        wire_dtype: str,
        on_round: Callable[[RoundReport], None],
        grid: PromptGrid | None = None,
        first_round: int = 1,
        **fedavg_args: Any,
    ) -> None:
        super().__init__(
            weighted_by_key=WEIGHT_KEY, fraction_evaluate=0.0, train_metrics_aggr_fn=summarize_round, **fedavg_args
        )
        self.use_flexlora = use_flexlora
        self.lora_rank = lora_rank
        self.flexlora_split = flexlora_split
        self.wire_dtype = wire_dtype
        self.on_round = on_round
        # The global adapter the round's updates must match, set when the round is configured.
        self.current: ArrayRecord | None = None
        self.sent_bytes = 0  # the packed global adapter each sampled node receives this round
        # The Grid names the node behind a SuperLink's error reply and keeps partition
        # owners; without one (a bare strategy) replies name their nodes and none repeats.
        self.grid = grid
        self.sampled: list[int] = []  # this round's nodes, to name those that never answered
        # A resumed run's next round: Flower counts from 1, the run from here, so clients
        # get the round's true learning rate and data seed, and checkpoints their number.
        self.first_round = first_round
        # Partition ids that nodes' replies have named, to name them again when they fail.
        self.partitions: dict[int, int] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The global adapter goes out packed (`app.wire`); the strategy keeps it per tensor."""
        self.current = arrays
        packed = pack(arrays, self.wire_dtype)
        self.sent_bytes = len(packed_bytes(packed))
        server_round += self.first_round - 1
        messages = list(super().configure_train(server_round, packed, config, grid))
        self.sampled = [m.metadata.dst_node_id for m in messages]
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.first_round - 1
        replies = list(replies)
        answered, errored = self._check_and_log_replies(replies, is_train=True, validate=False)
        replied = {self.node_of(m) for m in replies}
        silent = [n for n in self.sampled if n not in replied]
        if self.grid is not None:
            for node in [self.node_of(m) for m in errored] + silent:
                self.grid.owners.release(node)
        accepted, rejected = [], []
        received: dict[int, int] = {}
        # In node order, so that of two nodes repeating a partition the same one keeps it.
        for msg in sorted(answered, key=lambda m: m.metadata.src_node_id):
            node, partition = msg.metadata.src_node_id, _partition_of(msg)
            received[node] = _payload_bytes(msg)
            if partition is not None:
                self.partitions[node] = partition
            repeat = self.repeated_partition(node, partition)
            problem = repeat or self.unpack_reply(msg) or self.find_problem(msg.content)
            if problem and not repeat and self.grid is not None:
                self.grid.owners.release(node)  # a bad update owns nothing
            if problem:
                log(WARNING, "Round %d: rejected the update of node %d: %s", server_round, node, problem)
                rejected.append({"node-id": node, "partition-id": partition, "reason": problem})
            else:
                accepted.append(msg)
        arrays = metrics = None
        start = time.perf_counter()
        if accepted:
            contents = [msg.content for msg in accepted]
            arrays = self._aggregate_arrays(contents)
            metrics = self.train_metrics_aggr_fn(contents, WEIGHT_KEY)
        else:
            log(WARNING, "Round %d: no update to aggregate; the global adapter stays as it was", server_round)
        self.on_round(
            RoundReport(
                server_round=server_round,
                arrays=arrays if arrays is not None else self.current,
                clients=[
                    {
                        "node-id": m.metadata.src_node_id,
                        **_metrics_of(m.content),
                        "bytes-to-client": self.sent_bytes,
                        "bytes-from-client": received[m.metadata.src_node_id],
                    }
                    for m in accepted
                ],
                rejected=rejected,
                failed=[self.failure(self.node_of(m), m.error.reason) for m in errored]
                + [self.failure(n, "no reply within strategy.round-timeout") for n in silent],
                aggregate=dict(metrics) if metrics is not None else {},
                aggregate_seconds=time.perf_counter() - start,
            )
        )
        return arrays, metrics

    def node_of(self, reply: Message) -> int:
        return self.grid.node_of(reply) if self.grid is not None else reply.metadata.src_node_id

    def repeated_partition(self, node: int, partition: int | None) -> str | None:
        """Two nodes on one partition would count its rows twice: only its owner's update counts."""
        if self.grid is None or partition is None or (owner := self.grid.claim(node, partition)) is None:
            return None
        return f"partition-id {partition} is node {owner}'s, which is online: a repeated node config partition-id"

    def failure(self, node: int, reason: str) -> dict[str, Any]:
        partition = self.partitions.get(node)
        log(WARNING, "Node %d (partition %s) failed: %s", node, "unknown" if partition is None else partition, reason)
        return {"node-id": node, "partition-id": partition, "reason": reason}

    def unpack_reply(self, msg: Message) -> str | None:
        """Replaces the reply's packed adapter by its tensors, or says why it cannot."""
        if len(msg.content.array_records) != 1:
            return "expected one ArrayRecord and one MetricRecord"
        name, record = next(iter(msg.content.array_records.items()))
        try:
            msg.content[name] = ArrayRecord({k: Array(v) for k, v in unpack(record, self.wire_dtype).items()})
        except WireError as err:
            return str(err)
        return None

    def find_problem(self, content: RecordDict) -> str | None:
        """Why an update must not be aggregated, or None when it is sound."""
        if len(content.array_records) != 1 or len(content.metric_records) != 1:
            return "expected one ArrayRecord and one MetricRecord"
        metrics = _metrics_of(content)
        weight = metrics.get(WEIGHT_KEY)
        if not isinstance(weight, (int, float)) or not weight > 0 or not math.isfinite(weight):
            return f"metric {WEIGHT_KEY} = {weight!r} is not a positive number"
        for key in REQUIRED_METRICS:  # what the round's summary reads
            value = metrics.get(key)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                return f"metric {key} = {value!r} is not a finite number"
        arrays = next(iter(content.array_records.values()))
        assert self.current is not None, "configure_train always runs before aggregate_train"
        if set(arrays) != set(self.current):
            missing, extra = set(self.current) - set(arrays), set(arrays) - set(self.current)
            return f"adapter keys differ: missing {_some(missing)}, unexpected {_some(extra)}"
        for key in sorted(arrays):  # the first problem named is the same whatever the order sent
            array, expected = arrays[key], self.current[key]
            if array.shape != expected.shape or array.dtype != expected.dtype:
                return f"{key}: {array.dtype}{list(array.shape)} instead of {expected.dtype}{list(expected.shape)}"
            if not np.isfinite(array.numpy()).all():
                return f"{key}: contains NaN or infinite values"
        return None

    def _aggregate_arrays(self, contents: list[RecordDict]) -> ArrayRecord:
        states = [next(iter(c.array_records.values())).to_torch_state_dict() for c in contents]
        weights = [float(_metrics_of(c)[WEIGHT_KEY]) for c in contents]
        if not self.use_flexlora:
            return ArrayRecord(fedavg(states, weights))
        return ArrayRecord(flexlora(states, weights, self.lora_rank, self.flexlora_split))


def summarize_round(contents: list[RecordDict], weight_key: str) -> MetricRecord:
    """Loss averaged by examples; work summed; time is the slowest node's, as the round waits for it."""
    rows = [_metrics_of(c) for c in contents]
    total = sum(float(r[weight_key]) for r in rows)
    return MetricRecord(
        {
            "train-loss": sum(float(r["train-loss"]) * float(r[weight_key]) for r in rows) / total,
            weight_key: total,
            "train-tokens": sum(float(r["train-tokens"]) for r in rows),
            "train-seconds": max(float(r["train-seconds"]) for r in rows),
            "peak-gpu-bytes": max(float(r["peak-gpu-bytes"]) for r in rows),
        }
    )


def _partition_of(msg: Message) -> int | None:
    records = list(msg.content.metric_records.values())
    value = records[0].get("partition-id") if len(records) == 1 else None
    return int(value) if isinstance(value, (int, float)) else None


def _payload_bytes(msg: Message) -> int:
    """The packed adapter a reply carries, in bytes (0 when it carries none we can read)."""
    try:
        return sum(len(packed_bytes(r)) for r in msg.content.array_records.values())
    except WireError:
        return sum(a.numpy().nbytes for r in msg.content.array_records.values() for a in r.values())


def _some(keys: set[str], shown: int = 3) -> str:
    """Names the first few keys, so a rejection says which adapter modules disagree."""
    names = sorted(keys)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return (", ".join(names[:shown]) or "none") + more


def _metrics_of(content: RecordDict) -> dict[str, Any]:
    return dict(next(iter(content.metric_records.values())))
