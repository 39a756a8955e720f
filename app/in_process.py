"""Training inside the ClientApp process: the path when no trainer serves the node.

It pays imports, data and model loading every round (Flower starts a fresh ClientApp
process per message), which is why deployments run warm trainers; this path keeps
`flwr run` working against a deployment that has none.
"""

from __future__ import annotations

import signal
import threading
import time
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from app.config import AppConfig, NodeSettings
from app.dataset import load_partition, tokenize_partition
from app.gpu_admission import gpu_slot, resolve_checkpointing, trainings_per_gpu, visible_gpu_bytes, visible_gpu_id
from app.models import build_model, load_tokenizer
from app.train import train_round


def train_in_process(
    config: AppConfig, node: NodeSettings, server_round: int, adapter: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    start = time.perf_counter()
    _wait_for_own_children()
    partition = load_partition(config.dataset, node.partition_id, config.train.seed)
    tokenizer = load_tokenizer(config.model)
    data = tokenize_partition(partition, tokenizer, config.train, config.dataset, node.partition_id)
    # The round's sampled nodes may all land on this GPU.
    sampled = config.strategy.nodes_per_round(config.dataset.num_partitions)
    model_settings = resolve_checkpointing(config.model, config.train, sampled, visible_gpu_bytes())
    admission = nullcontext()
    if node.lock_dir is not None and torch.cuda.is_available():
        slots = trainings_per_gpu(config.train.max_trainings_per_gpu, model_settings, config.train)
        admission = gpu_slot(node.lock_dir, slots, visible_gpu_id())
    with admission:
        model = build_model(model_settings)
        prepared = time.perf_counter() - start
        state, metrics = train_round(
            model, tokenizer, data, config, server_round, {k: torch.from_numpy(v) for k, v in adapter.items()}
        )
        del model
        torch.cuda.empty_cache()  # free the GPU before the next client takes the slot
    return {k: v.numpy() for k, v in state.items()}, {
        **metrics,
        "num-examples": len(partition),
        "rows-without-label": len(partition) - len(data),
        "prepare-seconds": prepared,
    }


def _wait_for_own_children() -> None:
    """A SuperNode started under deploy.reaped hands its ClientApps SIGCHLD "ignored", so
    that its SuperExec leaves no zombies; training may start processes of its own (the
    compiler and workers of torch.compile, for flex attention) and must get their exit status."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
