import pytest

from app.config import AppConfig
from app.dataset import IGNORE_INDEX, PREAMBLE, load_partition, prompt_and_response, tokenize_example
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
    import json

    source = [tuple(sorted(r.items())) for r in json.loads(open(config.dataset.data_files[0]).read())]
    assert sorted(rows) == sorted(source)
    assert len(set(rows)) == len(rows)
    assert {len(p) for p in parts} == {len(source) // 20}
    again = load_partition(config.dataset, 7, config.train.seed)
    assert again[:] == parts[7][:]
