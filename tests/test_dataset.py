from app.config import AppConfig
from app.dataset import IGNORE_INDEX, PREAMBLE, load_partition, prompt_and_response, tokenize_example
from app.models import load_tokenizer


def test_prompt_follows_the_flowertune_template():
    prompt, response = prompt_and_response({"instruction": "Add.", "input": "2 and 3", "output": " 5 "})
    assert prompt == f"{PREAMBLE}\n### Instruction:\nAdd. 2 and 3\n### Response: "
    assert response == "5"
    prompt, _ = prompt_and_response({"instruction": "Say hi.", "input": "", "output": "hi"})
    assert prompt.endswith("### Instruction:\nSay hi.\n### Response: ")


def test_labels_cover_exactly_the_response(run_config):
    config = AppConfig.from_run_config(run_config)
    tokenizer = load_tokenizer(config.model)
    row = {"instruction": "Describe a river.", "input": "", "output": "river summer coffee market."}
    out = tokenize_example(row, tokenizer, seq_length=512)
    prompt, response = prompt_and_response(row)
    answer = [i for i, label in zip(out["input_ids"], out["labels"]) if label != IGNORE_INDEX]
    assert tokenizer.decode(answer, skip_special_tokens=True).replace(" ", "") == response.replace(" ", "")
    assert answer[-1] == tokenizer.eos_token_id
    assert out["input_ids"][0] == tokenizer.bos_token_id
    masked = [i for i, label in zip(out["input_ids"], out["labels"]) if label == IGNORE_INDEX]
    assert tokenizer.decode(masked, skip_special_tokens=True).replace(" ", "") == prompt.replace(" ", "")


def test_truncation_to_seq_length(run_config):
    config = AppConfig.from_run_config(run_config)
    tokenizer = load_tokenizer(config.model)
    row = {"instruction": "Describe a river.", "input": "", "output": "river " * 200}
    out = tokenize_example(row, tokenizer, seq_length=64)
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
