"""FedAvgOrFlexLora on real Flower Messages: weighting, FlexLoRA, and rejection of bad updates."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import save

from app.grid import PromptGrid
from app.strategy import FedAvgOrFlexLora, RoundReport
from app.wire import KEY, pack, pack_bytes, unpack

pytestmark = pytest.mark.unit

KEYS = ("m.q_proj.lora_A.weight", "m.q_proj.lora_B.weight")


@pytest.fixture(autouse=True)
def _server_identity():
    """Messages read the sender's identity from the runtime; give them one as a ServerApp would have."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def adapter(seed: int, rank: int = 4) -> dict[str, torch.Tensor]:
    """Values bfloat16 holds exactly, as every adapter that crossed the wire: the aggregation is then exact."""
    g = torch.Generator().manual_seed(seed)
    state = {KEYS[0]: torch.randn(rank, 12, generator=g), KEYS[1]: torch.randn(10, rank, generator=g)}
    return {k: v.bfloat16().float() for k, v in state.items()}


def reply(node: int, state: dict, examples: float = 10, **extra_metrics) -> Message:
    instruction = Message(RecordDict(), dst_node_id=node, message_type="train")
    metrics = {
        "num-examples": examples,
        "train-loss": 1.0,
        "train-tokens": 5,
        "train-seconds": 1.0,
        "peak-gpu-bytes": 0,
    }
    arrays = state if isinstance(state, ArrayRecord) else pack({k: v.numpy() for k, v in state.items()}, "bfloat16")
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({**metrics, **extra_metrics})})
    return Message(content, reply_to=instruction)


def make_strategy(use_flexlora=False, grid=None):
    reports: list[RoundReport] = []
    strategy = FedAvgOrFlexLora(
        use_flexlora=use_flexlora,
        lora_rank=4,
        flexlora_split="reference",
        wire_dtype="bfloat16",
        on_round=reports.append,
        grid=grid,
        fraction_train=0.1,
    )
    strategy.current = ArrayRecord(adapter(0))
    return strategy, reports


def test_fedavg_weights_by_example_count():
    strategy, reports = make_strategy()
    a, b = adapter(1), adapter(2)
    arrays, metrics = strategy.aggregate_train(1, [reply(11, a, examples=1), reply(12, b, examples=3)])
    out = arrays.to_torch_state_dict()
    for key in KEYS:
        torch.testing.assert_close(out[key], 0.25 * a[key] + 0.75 * b[key])
    assert metrics["num-examples"] == 4 and metrics["train-tokens"] == 10
    assert [c["node-id"] for c in reports[0].clients] == [11, 12]
    assert reports[0].arrays is arrays


def test_a_sampled_node_that_never_answers_is_recorded_with_its_partition(reliability):
    """Round 1: node 21 answers as partition 7. Round 2: it is sampled again and stays
    silent past the round's timeout; the round names it, with the partition it had."""
    strategy, reports = make_strategy()
    strategy.sampled = [11, 21]
    strategy.aggregate_train(
        1, [reply(11, adapter(1), **{"partition-id": 3}), reply(21, adapter(2), **{"partition-id": 7})]
    )
    strategy.aggregate_train(2, [reply(11, adapter(3), **{"partition-id": 3})])
    assert reports[0].failed == []
    assert reports[1].failed == [{"node-id": 21, "partition-id": 7, "reason": "no reply within strategy.round-timeout"}]
    assert [c["node-id"] for c in reports[1].clients] == [11]
    (silent,) = reports[1].failed
    reliability.record(
        "fault",
        "a sampled node (partition 7 in round 1) silent past strategy.round-timeout in round 2",
        f"round 2 recorded node {silent['node-id']}, partition {silent['partition-id']} as failed ({silent['reason']}) "
        f"and aggregated {len(reports[1].clients)} update",
        rounds_lost=sum(not r.clients for r in reports),
    )


def test_flexlora_keeps_shapes_and_reproduces_the_weighted_product():
    strategy, _ = make_strategy(use_flexlora=True)
    a = adapter(1, rank=4)
    b = {KEYS[0]: a[KEYS[0]], KEYS[1]: 2 * a[KEYS[1]]}  # same A: the weighted sum stays rank 4
    arrays, _ = strategy.aggregate_train(1, [reply(11, a, 1), reply(12, b, 1)])
    out = arrays.to_torch_state_dict()
    assert out[KEYS[0]].shape == (4, 12) and out[KEYS[1]].shape == (10, 4)
    expected = 0.5 * (a[KEYS[1]] @ a[KEYS[0]]) + 0.5 * (b[KEYS[1]] @ b[KEYS[0]])
    torch.testing.assert_close(out[KEYS[1]] @ out[KEYS[0]], expected, rtol=1e-5, atol=1e-5)


def test_bad_updates_are_rejected_logged_and_never_aggregated(caplog, reliability):
    strategy, reports = make_strategy()
    good = adapter(1)
    nan = adapter(2)
    nan[KEYS[0]][0, 0] = float("nan")
    wrong_keys = {"other.lora_A.weight": good[KEYS[0]], KEYS[1]: good[KEYS[1]]}
    wrong_shape = adapter(3, rank=5)
    unpacked = ArrayRecord(good)  # one Array per tensor: not what our ClientApp sends
    garbage = pack_bytes(b"not a safetensors file")
    float32 = pack_bytes(save(good))  # a safetensors file, but twice the bytes the wire carries
    crashed = Message(
        Error(code=2, reason="CUDA out of memory"), reply_to=Message(RecordDict(), dst_node_id=16, message_type="train")
    )
    bad = {  # node: what its update carries, the update
        12: ("a NaN in the adapter", reply(12, nan)),
        13: ("an adapter with another key", reply(13, wrong_keys)),
        14: ("an adapter of LoRA rank 5, the global one's 4", reply(14, wrong_shape)),
        15: ("num-examples = 0", reply(15, good, examples=0)),
        19: ("train-loss = NaN", reply(19, {k: v.clone() for k, v in good.items()}, **{"train-loss": float("nan")})),
        17: ("the adapter as one Array per tensor, not packed", reply(17, unpacked)),
        18: ("bytes that are not a safetensors file", reply(18, garbage)),
        20: ("an adapter in float32, not the wire's bfloat16", reply(20, float32)),
    }
    replies = [reply(11, good), *(update for _, update in bad.values()), crashed]
    arrays, _ = strategy.aggregate_train(3, replies)
    out = arrays.to_torch_state_dict()
    for key in KEYS:
        torch.testing.assert_close(out[key], good[key])
    report = reports[0]
    assert [c["node-id"] for c in report.clients] == [11]
    reasons = {r["node-id"]: r["reason"] for r in report.rejected}
    assert set(reasons) == {12, 13, 14, 15, 17, 18, 19, 20}
    assert reasons[19] == "metric train-loss = nan is not a finite number"
    assert "NaN" in reasons[12] and "[5, 12]" in reasons[14]
    assert reasons[13] == f"adapter keys differ: missing {KEYS[0]}, unexpected other.lora_A.weight"
    assert "num-examples" in reasons[15]
    assert reasons[17].startswith(f"expected one array named {KEY}, got 2")
    assert reasons[18].startswith(f"{KEY} is not a safetensors file")
    assert reasons[20] == f"{KEY}: {KEYS[0]} is torch.float32, the wire carries torch.bfloat16 (strategy.wire-dtype)"
    assert report.failed == [{"node-id": 16, "partition-id": None, "reason": "CUDA out of memory"}]
    aggregated = f"the round aggregated node {report.clients[0]['node-id']} only"
    for node, (what, _) in bad.items():
        (line,) = [m for m in caplog.messages if m.startswith(f"Round 3: rejected the update of node {node}: ")]
        reliability.record("bad input", f"a client's update with {what}", f"{line}; {aggregated}")
    (failed,) = report.failed
    reliability.record(
        "fault",
        "a client whose training crashed (an error reply)",
        f"recorded as failed: node {failed['node-id']}, {failed['reason']}; {aggregated}",
        rounds_lost=int(not report.clients),
    )


def test_round_without_a_good_update_keeps_the_global_adapter(caplog, reliability):
    strategy, reports = make_strategy()
    nan = adapter(2)
    nan[KEYS[1]][:] = float("inf")
    arrays, metrics = strategy.aggregate_train(2, [reply(11, nan)])
    assert arrays is None and metrics is None
    assert reports[0].arrays is strategy.current and reports[0].clients == []
    assert np.isfinite(strategy.current[KEYS[1]].numpy()).all()
    said = [m for m in caplog.messages if m.startswith("Round 2: ")]
    assert said[-1] == "Round 2: no update to aggregate; the global adapter stays as it was"
    reliability.record("bad input", "a round whose only update has inf in its adapter", "; ".join(said))


def test_the_global_adapter_travels_as_one_packed_array():
    """Flower moves each Array as its own object: one file keeps a round's transfers few."""
    strategy, _ = make_strategy()
    sent = ArrayRecord(adapter(5))

    class Nodes:
        def get_node_ids(self):
            return [1, 2, 3]

        def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
            return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    (message, *_) = strategy.configure_train(1, sent, ConfigRecord(), Nodes())
    assert list(message.content["arrays"]) == [KEY]
    got = unpack(message.content["arrays"], "bfloat16")
    for key, tensor in adapter(5).items():
        np.testing.assert_array_equal(got[key], tensor.numpy())
    assert strategy.current is sent


class Federation(Grid):
    """Flower's Grid as far as partition ownership asks it: which nodes are online."""

    def __init__(self, online: set[int]):
        self.online = online

    def get_node_ids(self):
        return sorted(self.online)

    @property
    def run(self):
        raise NotImplementedError

    def set_run(self, run):
        raise NotImplementedError

    def create_message(self, *args, **kwargs):
        raise NotImplementedError

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        raise NotImplementedError


def test_a_repeated_partition_counts_once_and_its_repeat_is_held_back_while_the_owner_is_online():
    federation = Federation({11, 12, 13})
    grid = PromptGrid(federation)
    strategy, reports = make_strategy(grid=grid)
    p1 = {"partition-id": 1}
    strategy.aggregate_train(
        1, [reply(12, adapter(1), **p1), reply(11, adapter(2), **p1), reply(13, adapter(3), **{"partition-id": 2})]
    )
    assert [c["node-id"] for c in reports[0].clients] == [11, 13], "of two repeats in one round, the lower node id"
    assert reports[0].rejected == [
        {
            "node-id": 12,
            "partition-id": 1,
            "reason": "partition-id 1 is node 11's, which is online: a repeated node config partition-id",
        }
    ]
    assert list(grid.get_node_ids()) == [11, 13]
    federation.online.discard(11)  # the owner went offline: the repeat may train partition 1
    assert list(grid.get_node_ids()) == [12, 13]
    strategy.aggregate_train(2, [reply(12, adapter(4), **p1)])
    assert [c["node-id"] for c in reports[1].clients] == [12] and reports[1].rejected == []


def test_an_owner_whose_update_is_rejected_gives_its_partition_up():
    """Else a node sending NaN would keep the partition, and the good node on it would be
    refused and held back for as long as the bad one stays online."""
    grid = PromptGrid(Federation({11, 12}))
    strategy, reports = make_strategy(grid=grid)
    nan = adapter(1)
    nan[KEYS[0]][0, 0] = float("nan")
    strategy.aggregate_train(1, [reply(11, nan, **{"partition-id": 1}), reply(12, adapter(2), **{"partition-id": 1})])
    assert [c["node-id"] for c in reports[0].clients] == [12]
    (rejected,) = reports[0].rejected
    assert rejected["node-id"] == 11 and "NaN" in rejected["reason"]
    assert list(grid.get_node_ids()) == [11, 12], "node 11 is no repeat: it never owned the partition"
