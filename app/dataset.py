"""One node's share of the Alpaca data, as token ids with the loss on the response only.

The hub dataset and an offline copy of it (`json` data files) go through the same
`FederatedDataset` call, so partitions are identical wherever the rows come from.
"""

from __future__ import annotations

from typing import Any, Mapping

from datasets import Dataset
from flwr_datasets import FederatedDataset
from flwr_datasets.partitioner import IidPartitioner
from transformers import PreTrainedTokenizerBase

from app.config import DatasetSettings

# The FlowerTune LLM template's Alpaca prompt, so scores stay comparable on the leaderboard.
PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
IGNORE_INDEX = -100


def federated_dataset(settings: DatasetSettings, seed: int) -> FederatedDataset:
    """Every node builds the same shuffled IID split; a trainer keeps one for all its nodes."""
    source: dict[str, Any] = {"dataset": settings.name}
    if settings.data_files:
        source = {"dataset": "json", "data_files": list(settings.data_files)}
    return FederatedDataset(
        **source,
        partitioners={"train": IidPartitioner(num_partitions=settings.num_partitions)},
        seed=seed,
    )


def load_partition(settings: DatasetSettings, partition_id: int, seed: int) -> Dataset:
    return federated_dataset(settings, seed).load_partition(partition_id, "train")


def prompt_and_response(example: Mapping[str, str]) -> tuple[str, str]:
    """Alpaca rows carry `instruction`, an optional `input` and `output`.

    The template appends a non-empty input to the instruction with a space; we do too.
    """
    instruction = example["instruction"].strip()
    extra = (example.get("input") or "").strip()
    if extra:
        instruction = f"{instruction} {extra}"
    return f"{PREAMBLE}\n### Instruction:\n{instruction}\n### Response: ", example["output"].strip()


def tokenize_example(example: Mapping[str, str], tokenizer: PreTrainedTokenizerBase, seq_length: int) -> dict:
    """Prompt and response are tokenized apart, so the label mask falls exactly on the response."""
    prompt, response = prompt_and_response(example)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    input_ids = (prompt_ids + response_ids)[:seq_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:seq_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def tokenize_partition(partition: Dataset, tokenizer: PreTrainedTokenizerBase, seq_length: int) -> Dataset:
    """Rows whose prompt fills the whole window have nothing to learn from and are dropped."""
    tokenized = partition.map(
        tokenize_example,
        fn_kwargs={"tokenizer": tokenizer, "seq_length": seq_length},
        remove_columns=partition.column_names,
    )
    return tokenized.filter(lambda row: any(label != IGNORE_INDEX for label in row["labels"]))
