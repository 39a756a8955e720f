"""GPU admission: at most N trainings at once on one physical GPU, across containers.

Each round samples nodes at random, so two sampled nodes can share a GPU. A training
holds one of N slot files (`fcntl.flock` on a volume every node of the host shares),
keyed by the GPU's UUID, so the limit holds whatever CUDA calls the device inside each
container. The kernel drops a lock when its process dies, so a crashed client never
keeps a slot.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from transformers import AutoConfig

from app.config import ModelSettings, TrainSettings

log = logging.getLogger(__name__)
GIB = 1024**3
# Bytes per parameter once loaded, by quantization (4-bit NF4 with double quant keeps
# embeddings, norms and the LM head in bf16: measured 5.7 GiB for Gemma2-9B's 9.24 B).
BYTES_PER_PARAM = {4: 0.66, 8: 1.15, 0: 2.0}
# What a training process holds beyond its weights (activations, optimizer state, CUDA
# context, allocator slack), measured for Gemma2-9B (42 layers x 3584 hidden) at batch
# 2 x 512 tokens on an H100 with `build_model`: 11.08 GiB per process with gradient
# checkpointing, 21.08 GiB without, 5.73 GiB of it weights (bench/results/memory_side_by_side.txt).
REFERENCE_TOKENS_X_WIDTH = 2 * 512 * 42 * 3584
ACTIVATION_BYTES = {True: 5.35 * GIB, False: 15.35 * GIB}


def estimate_training_bytes(model: ModelSettings, train: TrainSettings) -> float:
    """Peak memory of one client, scaled from measurements by parameters and activations."""
    config = AutoConfig.from_pretrained(model.name)
    text = getattr(config, "text_config", config)
    layers, hidden = text.num_hidden_layers, text.hidden_size
    params = text.vocab_size * hidden + layers * (
        hidden * text.num_attention_heads * text.head_dim * 2
        + hidden * text.num_key_value_heads * text.head_dim * 2
        + 3 * hidden * text.intermediate_size
    )
    scale = train.batch_size * train.seq_length * layers * hidden / REFERENCE_TOKENS_X_WIDTH
    return params * BYTES_PER_PARAM[model.quantization] + ACTIVATION_BYTES[model.gradient_checkpointing] * scale


def trainings_per_gpu(configured: int, model: ModelSettings, train: TrainSettings) -> int:
    """`configured` > 0 wins; 0 means: as many as fit in 90% of this GPU's memory."""
    if configured > 0:
        return configured
    total = torch.cuda.get_device_properties(0).total_memory
    return max(1, math.floor(0.9 * total / estimate_training_bytes(model, train)))


def visible_gpu_id() -> str:
    """The same physical GPU has the same UUID in every container that sees it."""
    return str(torch.cuda.get_device_properties(0).uuid)


@contextmanager
def gpu_slot(lock_dir: Path, slots: int, uuid: str) -> Iterator[None]:
    """Holds one of the GPU's `slots`; a client that must wait says so."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    paths = [lock_dir / f"gpu-{uuid}.slot{k}" for k in range(slots)]
    handles = [p.open("a+") for p in paths]
    try:
        held = next((h for h in handles if _try_lock(h)), None)
        if held is None:
            log.warning("GPU %s: all %d training slots busy; waiting for one", uuid, slots)
            held = handles[os.getpid() % slots]
            fcntl.flock(held, fcntl.LOCK_EX)
            log.warning("GPU %s: got a training slot", uuid)
        yield
    finally:
        for h in handles:
            h.close()  # closing releases the lock


def _try_lock(handle) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
