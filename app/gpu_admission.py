"""GPU admission: at most N trainings at once on one physical GPU, across containers.

Each round samples nodes at random, so two sampled nodes can share a GPU. A training
holds one of N slot files (`fcntl.flock` on a volume every node of the host shares),
keyed by the GPU's UUID, so the limit holds whatever CUDA calls the device inside each
container. The kernel drops a lock when its process dies, so a crashed client never
keeps a slot.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoConfig

from app.config import ConfigError, ModelSettings, TrainSettings
from app.slots import hold_first_free

GIB = 1024**3
MEMORY_SHARE = 0.9  # of a GPU's memory that trainings may plan on; the rest is slack
# Bytes per parameter once loaded, by quantization (4-bit NF4 with double quant keeps
# embeddings, norms and the LM head in bf16: measured 5.7 GiB for Gemma2-9B's 9.24 B).
BYTES_PER_PARAM = {4: 0.66, 8: 1.15, 0: 2.0}
# What a training process holds beyond its weights (activations, optimizer state, CUDA
# context, allocator slack), measured for Gemma2-9B (42 layers x 3584 hidden) at batch
# 2 x 512 tokens on an H100 with `build_model`: 11.08 GiB per process with gradient
# checkpointing, 21.08 GiB without, 5.73 GiB of it weights (bench/memory/ours_vs_template.txt).
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
    """`configured` > 0 wins; 0 means: as many as fit in MEMORY_SHARE of this GPU's memory."""
    if configured > 0:
        return configured
    return max(1, trainings_that_fit(model, train, torch.cuda.get_device_properties(0).total_memory))


def trainings_that_fit(model: ModelSettings, train: TrainSettings, gpu_bytes: int) -> int:
    """How many trainings of `model` (its checkpointing resolved) fit MEMORY_SHARE of a GPU."""
    return math.floor(MEMORY_SHARE * gpu_bytes / estimate_training_bytes(model, train))


def visible_gpu_id() -> str:
    """The same physical GPU has the same UUID in every container that sees it."""
    return str(torch.cuda.get_device_properties(0).uuid)


def gpu_slot(lock_dir: Path, slots: int, uuid: str):
    """Holds one of the GPU's `slots`; a client that must wait says so."""
    paths = [lock_dir / f"gpu-{uuid}.slot{k}" for k in range(slots)]
    return hold_first_free(paths, f"GPU {uuid} training slots")


def visible_gpu_bytes() -> int | None:
    """Memory of the process's one visible GPU; None on the CPU, where nothing is planned."""
    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


def resolve_checkpointing(
    model: ModelSettings, train: TrainSettings, sharing: int, gpu_bytes: int | None
) -> ModelSettings:
    """Turns `gradient-checkpointing = "auto"` into on or off for this GPU.

    Off (faster: bench/round_time/historical_h100/RESULTS.md) when `sharing` trainings fit the GPU without it, on
    otherwise; on the CPU there is no memory to plan, so off.
    """
    if model.gradient_checkpointing is not None:
        return model
    off = replace(model, gradient_checkpointing=False)
    fits = gpu_bytes is None or sharing <= trainings_that_fit(off, train, gpu_bytes)
    return replace(model, gradient_checkpointing=not fits)


def check_fits(model: ModelSettings, train: TrainSettings, sharing: int, gpu_bytes: int | None) -> None:
    """`sharing` trainers that cannot all train at once would fail mid-round: say so at start."""
    if gpu_bytes is not None and sharing > (fit := trainings_that_fit(model, train, gpu_bytes)):
        need = estimate_training_bytes(model, train)
        raise ConfigError(
            f"--trainers-per-gpu {sharing}: {sharing} trainers of about {need / GIB:.1f} GiB each "
            "do not fit this GPU's "
            f"{gpu_bytes / GIB:.0f} GiB; use at most {fit} (or train.max-trainings-per-gpu = {fit})"
        )
