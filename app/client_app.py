"""The ClientApp: one round of local QLoRA training on this node's partition.

Where the node is configured with a warm trainer (`trainer-dir` in its node config),
the ClientApp stays thin: it imports no torch or transformers, hands the global adapter
to a free trainer of its host and turns the answer into the reply. Without one it trains
in its own process, as `flwr run` against any plain deployment expects.
"""

from __future__ import annotations

import time
from logging import INFO

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log

from app.config import AppConfig, NodeSettings
from app.trainer_client import train_remotely
from app.trainer_protocol import trainer_gpu
from app.wire import pack, pack_bytes, packed_bytes, unpack

app = ClientApp()
# A trainer may still be loading the model, or be restarting after a crash.
TRAINER_TIMEOUT_SECONDS = 900


@app.train()
def train(msg: Message, context: Context) -> Message:
    start = time.perf_counter()
    config = AppConfig.from_run_config(context.run_config)
    node = NodeSettings.from_node_config(context.node_config, config)
    config = node.own_data(config)
    server_round = int(msg.content["config"]["server-round"])
    if node.trainer_dir is None:
        log(INFO, "partition %d, round %d: training in this ClientApp process", node.partition_id, server_round)
        from app.in_process import train_in_process  # torch and transformers: this path only

        state, metrics = train_in_process(
            config, node, server_round, unpack(msg.content["arrays"], config.strategy.wire_dtype)
        )
        arrays = pack(state, config.strategy.wire_dtype)
    else:
        # The packed adapter is a safetensors file already: the trainer takes it as it is.
        reply = train_remotely(node, config, server_round, packed_bytes(msg.content["arrays"]), TRAINER_TIMEOUT_SECONDS)
        log(
            INFO,
            "partition %d, round %d: trained on warm trainer %s%s",
            node.partition_id,
            server_round,
            reply.trainer,
            " (its own GPU's were busy)" if reply.overflow else "",
        )
        arrays = pack_bytes(reply.adapter)
        metrics = {
            **reply.metrics,
            "queue-seconds": reply.queue_seconds,
            "trainer-overflow": int(reply.overflow),
            "gpu": trainer_gpu(reply.trainer),
        }
    metrics = {**metrics, "partition-id": node.partition_id, "client-seconds": time.perf_counter() - start}
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)
