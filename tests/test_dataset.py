import json
import logging

import pytest

from app.config import AppConfig, ConfigError
from app.dataset import (
    IGNORE_INDEX,
    PREAMBLE,
    load_partition,
    prompt_and_response,
    tokenize_example,
    tokenize_partition,
)
from app.models import load_tokenizer
from deploy.demo import alpaca_rows, gemma_like_tokenizer

pytestmark = pytest.mark.unit


def test_prompt_follows_the_general_nlp_template():
    row = {"instruction": "Add.", "input": "2 and 3", "output": " 5 "}
    prompt, response = prompt_and_response(row, append_input=False)
    assert prompt == f"{PREAMBLE}\n### Instruction:\nAdd.\n### Response: "
    assert response == " 5 "  # the template formats the row's text as it is
    prompt, _ = prompt_and_response(row, append_input=True)
    assert prompt == f"{PREAMBLE}\n### Instruction:\nAdd. 2 and 3\n### Response: "
    prompt, _ = prompt_and_response({"instruction": "Say hi.", "input": "", "output": "hi"}, append_input=True)
    assert prompt.endswith("### Instruction:\nSay hi.\n### Response: ")


def sentencepiece_style():
    """Byte fallback and Gemma's space rule (see deploy.demo.gemma_like_tokenizer)."""
    corpus = ["".join(prompt_and_response(row, append_input=True)) for row in alpaca_rows(200, seed=3)]
    return gemma_like_tokenizer(corpus, vocab_size=300)


@pytest.mark.parametrize("learn_eos", [False, True])
def test_ids_are_the_whole_texts_and_labels_start_at_the_response(learn_eos):
    tokenizer = sentencepiece_style()
    row = {"instruction": "Describe a river.", "input": "", "output": "river summer ☃ coffee market."}
    prompt, response = prompt_and_response(row, append_input=False)
    whole = tokenizer(prompt + response, add_special_tokens=False, return_offsets_mapping=True)
    apart = (
        tokenizer(prompt, add_special_tokens=False)["input_ids"]
        + tokenizer(response, add_special_tokens=False)["input_ids"]
    )
    assert apart != whole["input_ids"]  # the split the old tokenization made is real under these rules
    assert "<0xE2>" in tokenizer.convert_ids_to_tokens(whole["input_ids"])  # byte fallback in play

    out = tokenize_example(row, tokenizer, seq_length=512, learn_eos=learn_eos, append_input=False)
    eos = [tokenizer.eos_token_id] if learn_eos else []
    assert out["input_ids"] == [tokenizer.bos_token_id] + whole["input_ids"] + eos
    first = next(i for i, label in enumerate(out["labels"]) if label != IGNORE_INDEX)
    assert all(label == IGNORE_INDEX for label in out["labels"][:first])
    assert out["labels"][first:] == out["input_ids"][first:]
    # The first learned token is the response's first word, with the space before it, as in
    # the template's collator, which learns everything after "### Response:".
    start, _ = whole["offset_mapping"][first - 1]
    assert start == len(prompt) - 1
    assert tokenizer.decode(out["input_ids"][first:]) == " " + response + ("<eos>" if learn_eos else "")
    assert tokenizer.decode(out["input_ids"][1:first]) == prompt.rstrip()
    assert (out["input_ids"][-1] == tokenizer.eos_token_id) is learn_eos


def test_labels_cover_exactly_the_response(run_config):
    config = AppConfig.from_run_config(run_config)
    tokenizer = load_tokenizer(config.model)
    row = {"instruction": "Describe a river.", "input": "", "output": "river summer coffee market."}
    out = tokenize_example(row, tokenizer, seq_length=512, learn_eos=True, append_input=False)
    prompt, response = prompt_and_response(row, append_input=False)
    answer = [i for i, label in zip(out["input_ids"], out["labels"]) if label != IGNORE_INDEX]
    assert tokenizer.decode(answer, skip_special_tokens=True) == " " + response
    assert answer[-1] == tokenizer.eos_token_id
    assert out["input_ids"][0] == tokenizer.bos_token_id


def test_truncation_to_seq_length(run_config):
    config = AppConfig.from_run_config(run_config)
    tokenizer = load_tokenizer(config.model)
    row = {"instruction": "Describe a river.", "input": "", "output": "river " * 200}
    out = tokenize_example(row, tokenizer, seq_length=64, learn_eos=False, append_input=False)
    assert len(out["input_ids"]) == len(out["labels"]) == len(out["attention_mask"]) == 64


def test_iid_partitions_are_disjoint_and_cover_the_data(run_config):
    config = AppConfig.from_run_config(run_config)
    parts = [load_partition(config.dataset, pid, config.train.seed) for pid in range(config.dataset.num_partitions)]
    rows = [tuple(sorted(r.items())) for p in parts for r in p]

    source = [tuple(sorted(r.items())) for r in json.loads(open(config.dataset.data_files[0]).read())]
    assert sorted(rows) == sorted(source)
    assert len(set(rows)) == len(rows)
    assert {len(p) for p in parts} == {len(source) // 20}
    again = load_partition(config.dataset, 7, config.train.seed)
    assert again[:] == parts[7][:]


@pytest.mark.parametrize(
    "output, seq_length, teaches",
    [
        ("river summer.", 512, True),
        ("", 512, False),  # its labels are the space after "### Response:" and EOS: nothing of a response
        (" \n\t", 512, False),
        ("river summer.", 16, False),  # the prompt fills the window: the response is cut away
    ],
    ids=["a response", "empty", "whitespace", "truncated away"],
)
def test_a_row_teaches_only_with_a_response_token_left(run_config, output, seq_length, teaches):
    config = AppConfig.from_run_config(run_config)
    tokenizer = load_tokenizer(config.model)
    row = {"instruction": "Describe a river.", "input": "", "output": output}
    out = tokenize_example(row, tokenizer, seq_length=seq_length, learn_eos=True, append_input=False)
    assert out["teaches"] is teaches
    if output == "":
        assert any(label != IGNORE_INDEX for label in out["labels"])  # labels, but no lesson


def _data_file(path, outputs):
    rows = [{**row, "output": out} for row, out in zip(alpaca_rows(len(outputs), seed=2), outputs)]
    path.write_text(json.dumps(rows))
    return str(path)


def test_a_file_where_no_row_has_a_response_is_refused_in_one_line(run_config, tmp_path, reliability):
    data = _data_file(tmp_path / "blank.json", ["", " ", "\n"] * 10)
    config = AppConfig.from_run_config({**run_config, "dataset.data-files": data})
    with pytest.raises(ConfigError) as err:
        load_partition(config.dataset, 0, config.train.seed)
    assert str(err.value) == (
        f"dataset.data-files = '{data}': every row's 'output' is empty or whitespace (30 rows), "
        "so no row has a response to learn; each row needs one"
    )
    reliability.record(
        "bad input", "a data file whose 30 rows all have an empty or blank output", f"refused: {err.value}"
    )


def test_rows_without_a_label_are_dropped_and_counted(run_config, tmp_path, caplog, reliability):
    outputs = [row["output"] if i % 4 else "" for i, row in enumerate(alpaca_rows(200, seed=3))]
    config = AppConfig.from_run_config(
        {**run_config, "dataset.data-files": _data_file(tmp_path / "some.json", outputs)}
    )
    tokenizer = load_tokenizer(config.model)
    partition = load_partition(config.dataset, 0, config.train.seed)
    empty = sum(not row["output"] for row in partition)
    assert 0 < empty < len(partition)
    with caplog.at_level(logging.WARNING, logger="app.dataset"):
        data = tokenize_partition(partition, tokenizer, config.train, config.dataset, 0)
    assert len(partition) - len(data) == empty and "teaches" not in data.column_names
    said = (
        f"partition 0: {empty} of {len(partition)} rows have no response token to learn (an empty or blank 'output', "
        f"or a prompt that fills train.seq-length = {config.train.seq_length}); training on the other {len(data)}"
    )
    assert [r.getMessage() for r in caplog.records] == [said]
    reliability.record(
        "bad input", "a data file where every 4th row has an empty output", f"accepted, the node logs: {said}"
    )


def test_a_partition_with_nothing_to_learn_is_refused_in_one_line(run_config, tmp_path, reliability):
    config = AppConfig.from_run_config({**run_config, "train.seq-length": 16})
    tokenizer = load_tokenizer(config.model)
    partition = load_partition(config.dataset, 0, config.train.seed)
    with pytest.raises(ConfigError) as err:
        tokenize_partition(partition, tokenizer, config.train, config.dataset, 0)
    assert str(err.value) == (
        f"dataset.data-files = '{config.dataset.data_files[0]}': partition 0: {len(partition)} of {len(partition)} "
        "rows have no response token to learn (an empty or blank 'output', or a prompt that fills "
        "train.seq-length = 16)"
    )
    reliability.record("bad input", "train.seq-length = 16, shorter than every prompt", f"refused: {err.value}")
