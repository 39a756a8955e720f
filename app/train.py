"""The local training step: a fixed number of optimizer steps on one node's partition."""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass

import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase, Trainer, TrainingArguments

from app.config import AppConfig, TrainSettings
from app.dataset import IGNORE_INDEX


def cosine_learning_rate(server_round: int, num_rounds: int, lr_max: float, lr_min: float) -> float:
    """The FlowerTune template's schedule: one cosine from lr_max towards lr_min over all rounds."""
    return lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(math.pi * server_round / num_rounds))


@dataclass(frozen=True)
class TrainResult:
    loss: float
    seconds: float
    tokens: int
    peak_gpu_bytes: int


def build_trainer(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    settings: TrainSettings,
    learning_rate: float,
    server_round: int,
    output_dir: str,
) -> Trainer:
    """A fresh Trainer (so a fresh optimizer) for one round; the rows come in the order of
    `settings.data_seed(server_round)`, the same every round unless train.dynamic-data-seed."""
    on_gpu = torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        logging_steps=settings.logging_steps,
        max_steps=settings.max_steps,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        bf16=on_gpu,
        save_strategy="no",
        report_to=[],
        seed=settings.seed,
        data_seed=settings.data_seed(server_round),
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
        dataloader_pin_memory=on_gpu,
    )
    return Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX),
    )


def train_adapter(trainer: Trainer) -> TrainResult:
    """Runs one round's Trainer and measures what the metrics report."""
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - start
    return TrainResult(
        loss=float(output.training_loss),
        seconds=seconds,
        tokens=int(trainer.state.num_input_tokens_seen),
        peak_gpu_bytes=torch.cuda.max_memory_allocated() if on_gpu else 0,
    )


def train_round(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    config: AppConfig,
    server_round: int,
    adapter: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One node's round on a model that may have trained before: the global adapter in,
    a fresh optimizer (a new Trainer), the round's learning rate; the new adapter out."""
    learning_rate = cosine_learning_rate(
        server_round, config.strategy.num_rounds, config.train.learning_rate_max, config.train.learning_rate_min
    )
    set_peft_model_state_dict(model, adapter)
    with tempfile.TemporaryDirectory(prefix="flowertune-trainer-") as scratch:
        result = train_adapter(
            build_trainer(model, tokenizer, dataset, config.train, learning_rate, server_round, scratch)
        )
    # A copy: on a float32 CPU model `.to` returns the live parameter, which the next round would overwrite.
    state = {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in get_peft_model_state_dict(model).items()}
    metrics = {
        "train-loss": result.loss,
        "train-seconds": result.seconds,
        "train-tokens": result.tokens,
        "peak-gpu-bytes": result.peak_gpu_bytes,
        "learning-rate": learning_rate,
    }
    return state, metrics
