"""The ClientApp: one round of local QLoRA training on this node's partition.

Under the Deployment Engine each round runs in a fresh process, so everything is built
inside the handler; `build_model` is the single place a longer-lived worker would reuse.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from app.config import AppConfig, NodeSettings
from app.dataset import load_partition, tokenize_partition
from app.gpu_admission import gpu_slot, trainings_per_gpu, visible_gpu_id
from app.models import build_model, load_tokenizer
from app.train import cosine_learning_rate, train_adapter

app = ClientApp()


def _admission(config: AppConfig, node: NodeSettings):
    """Only GPU nodes given a shared lock folder queue for a slot on their GPU."""
    if node.lock_dir is None or not torch.cuda.is_available():
        return nullcontext()
    slots = trainings_per_gpu(config.train.max_trainings_per_gpu, config.model, config.train)
    return gpu_slot(node.lock_dir, slots, visible_gpu_id())


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = AppConfig.from_run_config(context.run_config)
    node = NodeSettings.from_node_config(context.node_config, config)
    server_round = int(msg.content["config"]["server-round"])

    partition = load_partition(config.dataset, node.partition_id, config.train.seed)
    tokenizer = load_tokenizer(config.model)
    data = tokenize_partition(partition, tokenizer, config.train.seq_length)
    learning_rate = cosine_learning_rate(
        server_round, config.strategy.num_rounds, config.train.learning_rate_max, config.train.learning_rate_min
    )
    with _admission(config, node):
        model = build_model(config.model)
        set_peft_model_state_dict(model, msg.content["arrays"].to_torch_state_dict())
        result = train_adapter(model, tokenizer, data, config.train, learning_rate)
        state = {k: v.detach().to("cpu", torch.float32) for k, v in get_peft_model_state_dict(model).items()}
        del model
        torch.cuda.empty_cache()  # free the GPU before the next client takes the slot
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
