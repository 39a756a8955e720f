"""The ClientApp: one round of local QLoRA training on this node's partition.

Under the Deployment Engine each round runs in a fresh process, so everything is built
inside the handler; `build_model` is the single place a longer-lived worker would reuse.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from app.config import AppConfig, NodeSettings
from app.dataset import load_partition, tokenize_partition
from app.models import build_model, load_tokenizer
from app.train import cosine_learning_rate, train_adapter

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = AppConfig.from_run_config(context.run_config)
    node = NodeSettings.from_node_config(context.node_config, config)
    server_round = int(msg.content["config"]["server-round"])

    partition = load_partition(config.dataset, node.partition_id, config.train.seed)
    tokenizer = load_tokenizer(config.model)
    data = tokenize_partition(partition, tokenizer, config.train.seq_length)
    model = build_model(config.model)
    set_peft_model_state_dict(model, msg.content["arrays"].to_torch_state_dict())

    learning_rate = cosine_learning_rate(
        server_round, config.strategy.num_rounds, config.train.learning_rate_max, config.train.learning_rate_min
    )
    result = train_adapter(model, tokenizer, data, config.train, learning_rate)

    state = {k: v.detach().to("cpu", torch.float32) for k, v in get_peft_model_state_dict(model).items()}
    metrics = MetricRecord(
        {
            "num-examples": len(partition),
            "partition-id": node.partition_id,
            "train-loss": result.loss,
            "train-seconds": result.seconds,
            "train-tokens": result.tokens,
            "peak-gpu-bytes": result.peak_gpu_bytes,
            "learning-rate": learning_rate,
        }
    )
    return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": metrics}), reply_to=msg)
