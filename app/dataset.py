"""One node's share of the Alpaca data, as token ids with the loss on the response only.

The hub dataset and an offline copy of it (`json` data files) go through the same
`FederatedDataset` call, so partitions are identical wherever the rows come from.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from datasets import Dataset
from datasets.exceptions import DatasetGenerationError
from flwr_datasets import FederatedDataset
from flwr_datasets.partitioner import IidPartitioner
from transformers import PreTrainedTokenizerBase

from app.config import ConfigError, DatasetSettings, TrainSettings

# The FlowerTune LLM template's Alpaca prompt, so scores stay comparable on the leaderboard.
PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
IGNORE_INDEX = -100

log = logging.getLogger(__name__)


def federated_dataset(settings: DatasetSettings, seed: int) -> FederatedDataset:
    """Every node builds the same shuffled IID split; a trainer keeps one for all its nodes."""
    settings.check_files()
    source: dict[str, Any] = {"dataset": settings.name}
    if settings.data_files:
        source = {"dataset": "json", "data_files": list(settings.data_files)}
    return FederatedDataset(
        **source,
        partitioners={"train": IidPartitioner(num_partitions=settings.num_partitions)},
        seed=seed,
    )


def load_partition(settings: DatasetSettings, partition_id: int, seed: int) -> Dataset:
    return checked_partition(federated_dataset(settings, seed), settings, partition_id)


def data_source(settings: DatasetSettings) -> str:
    """The setting that names where the rows come from, for a refusal's one line."""
    if settings.data_files:
        return f"dataset.data-files = {','.join(settings.data_files)!r}"
    return f"static.dataset.name = {settings.name!r}"


def checked_partition(dataset: FederatedDataset, settings: DatasetSettings, partition_id: int) -> Dataset:
    """One node's rows, refused in one line where they cannot train: data files that are
    not JSON rows, rows without the template's `instruction` and `output`, fewer rows
    than partitions (some would be empty), no row with a response to learn (every `output`
    empty or whitespace: the run would "complete" having learned only the space after the
    response tag). Otherwise each would surface mid-round as a traceback, or not at all."""
    source = data_source(settings)
    try:
        rows = dataset.load_partition(partition_id, "train")
    except (DatasetGenerationError, PermissionError, UnicodeDecodeError) as err:
        cause = err.__cause__ or err
        reason = " ".join(str(cause).split())[:160]
        raise ConfigError(f"{source}: cannot be read as JSON rows ({type(cause).__name__}: {reason})") from None
    missing = [c for c in ("instruction", "output") if c not in rows.column_names]
    if missing:
        named = " or ".join(repr(c) for c in missing)
        raise ConfigError(f"{source}: rows have no {named}; each row needs 'instruction' and 'output'")
    split = dataset.load_split("train")
    if split.num_rows < settings.num_partitions:
        raise ConfigError(
            f"{source}: {split.num_rows} rows for static.dataset.num-partitions = {settings.num_partitions}: "
            "some partitions would be empty"
        )
    if not any(isinstance(output, str) and output.strip() for output in split["output"]):
        raise ConfigError(
            f"{source}: every row's 'output' is empty or whitespace ({split.num_rows} rows), so no row has a "
            "response to learn; each row needs one"
        )
    return rows


def prompt_and_response(example: Mapping[str, str], append_input: bool) -> tuple[str, str]:
    """The General NLP template's text: its Alpaca prompt and the row's `output`, unstripped.

    The template keeps `instruction` and `response` only; with `append_input` a non-empty
    `input` follows the instruction after a space, as its finance and code tasks do.
    """
    instruction = example["instruction"]
    extra = example.get("input") or ""
    if append_input and extra.strip():
        instruction = f"{instruction} {extra}"
    return f"{PREAMBLE}\n### Instruction:\n{instruction}\n### Response: ", example["output"]


def tokenize_example(
    example: Mapping[str, str],
    tokenizer: PreTrainedTokenizerBase,
    seq_length: int,
    learn_eos: bool,
    append_input: bool,
) -> dict:
    """The whole text is tokenized once, as the model sees it at inference, and the loss
    falls on the tokens that start after the template's "### Response:" tag.

    `teaches` says whether the row has anything to learn: whether a labelled token that
    survives truncation to `seq_length` covers a character of the response that is not
    whitespace. The space token after the tag and EOS do not count: with an empty or blank
    `output`, or a prompt that leaves the response no room, they are all a row would teach.

    Tokenizing prompt and response apart would end the prompt in a lone space token that a
    SentencePiece tokenizer such as Gemma's never produces inside the whole text. Like the
    template's completion-only collator, the learned part starts at the response tag, so
    the space before the response belongs to its first token. BOS leads, as the template's
    `add_special_tokens=True` gives Gemma; EOS is learned only with `learn_eos`.
    """
    prompt, response = prompt_and_response(example, append_input)
    encoded = tokenizer(prompt + response, add_special_tokens=False, return_offsets_mapping=True)
    response_start = len(prompt.rstrip())
    content_start = len(prompt) + len(response) - len(response.lstrip())  # the text's end for a blank response
    input_ids = list(encoded["input_ids"])
    labels = [
        tid if start >= response_start else IGNORE_INDEX
        for tid, (start, _) in zip(input_ids, encoded["offset_mapping"])
    ]
    teaching = [start >= response_start and end > content_start for start, end in encoded["offset_mapping"]]
    if learn_eos:
        input_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
        teaching.append(False)
    if tokenizer.bos_token_id is not None:
        input_ids.insert(0, tokenizer.bos_token_id)
        labels.insert(0, IGNORE_INDEX)
        teaching.insert(0, False)
    input_ids, labels = input_ids[:seq_length], labels[:seq_length]
    return {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": labels,
        "teaches": any(teaching[:seq_length]),
    }


def tokenize_partition(
    partition: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    train: TrainSettings,
    dataset: DatasetSettings,
    partition_id: int,
) -> Dataset:
    """Rows with nothing to learn (`tokenize_example`'s `teaches`) are dropped: the template
    keeps them, a batch slot that teaches nothing. The node's log says how many, and the
    node's metrics report them (rows less the rows returned); a partition with none left is
    refused in one line, as its training would only fit the template's own tokens."""
    tokenized = partition.map(
        tokenize_example,
        fn_kwargs={
            "tokenizer": tokenizer,
            "seq_length": train.seq_length,
            "learn_eos": train.learn_eos,
            "append_input": dataset.append_input,
        },
        remove_columns=partition.column_names,
    )
    teaching = tokenized.filter(lambda row: row["teaches"]).remove_columns("teaches")
    idle = len(tokenized) - len(teaching)
    where = f"partition {partition_id}: {idle} of {len(tokenized)} rows"
    why = f"an empty or blank 'output', or a prompt that fills train.seq-length = {train.seq_length}"
    if not len(teaching):
        raise ConfigError(f"{data_source(dataset)}: {where} have no response token to learn ({why})")
    if idle:
        log.warning("%s have no response token to learn (%s); training on the other %d", where, why, len(teaching))
    return teaching
