"""The ServerApp's weightless adapter, the client's model, and checkpoints PEFT can load."""

import json
import logging

import pytest
import torch
from flwr.app import ArrayRecord
from peft import PeftModel, get_peft_model_state_dict
from transformers import AutoModelForCausalLM

from app.checkpoint import RunRecorder, save_adapter
from app.config import AppConfig
from app.dataset import load_partition, tokenize_partition
from app.models import build_model, initial_adapter, load_tokenizer, peft_quietly
from app.strategy import RoundReport
from app.train import build_trainer, cosine_learning_rate, train_adapter

pytestmark = pytest.mark.unit


def test_server_adapter_matches_the_clients_in_keys_shapes_dtypes(run_config):
    config = AppConfig.from_run_config(run_config)
    server = initial_adapter(config.model, seed=7)
    client = get_peft_model_state_dict(build_model(config.model))
    assert {k: (v.shape, v.dtype) for k, v in server.items()} == {k: (v.shape, v.dtype) for k, v in client.items()}
    assert all(not v.any() for k, v in server.items() if "lora_B" in k)
    assert all(v.abs().sum() > 0 for k, v in server.items() if "lora_A" in k)
    torch.testing.assert_close(server, initial_adapter(config.model, seed=7))


def test_generation_config_is_consistent_with_use_cache_off(run_config, tmp_path):
    """The tiny model ships Gemma2's `cache_implementation="hybrid"`, as the 9B one does.

    With `use_cache` off that setting makes transformers warn (older releases crashed while
    formatting the warning) and refuse to save the model; our loading code clears it.
    """
    config = AppConfig.from_run_config(run_config)
    model = build_model(config.model)
    model.generation_config.validate(strict=True)
    model.base_model.model.save_pretrained(tmp_path / "full")
    assert (tmp_path / "full" / "generation_config.json").is_file()


def test_training_changes_the_adapter_without_the_hybrid_cache_warning(run_config, caplog, tmp_path):
    config = AppConfig.from_run_config(run_config)
    tokenizer = load_tokenizer(config.model)
    data = tokenize_partition(
        load_partition(config.dataset, 0, config.train.seed), tokenizer, config.train, config.dataset, 0
    )
    with caplog.at_level(logging.WARNING):
        model = build_model(config.model)
        before = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
        result = train_adapter(build_trainer(model, tokenizer, data, config.train, 1e-3, 1, str(tmp_path)))
    after = get_peft_model_state_dict(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert result.tokens > 0 and result.loss > 0
    assert not [r for r in caplog.records if "cache_implementation" in r.getMessage()]


@pytest.mark.parametrize("dynamic", [False, True], ids=["fixed-seed", "dynamic-data-seed"])
def test_a_node_sampled_again_sees_another_first_batch_only_with_dynamic_data_seed(run_config, tmp_path, dynamic):
    run_config["train.dynamic-data-seed"] = dynamic
    config = AppConfig.from_run_config(run_config)
    tokenizer = load_tokenizer(config.model)
    data = tokenize_partition(
        load_partition(config.dataset, 3, config.train.seed), tokenizer, config.train, config.dataset, 3
    )
    model = build_model(config.model)
    first_batches = []
    for server_round in (2, 7):  # a node sampled in two rounds, each a fresh Trainer as in production
        trainer = build_trainer(model, tokenizer, data, config.train, 1e-3, server_round, str(tmp_path))
        first_batches.append(next(iter(trainer.get_train_dataloader()))["input_ids"].tolist())
    assert (first_batches[0] != first_batches[1]) is dynamic


def test_cosine_schedule_runs_from_max_towards_min():
    lrs = [cosine_learning_rate(r, 10, 5e-5, 1e-6) for r in range(1, 11)]
    assert lrs == sorted(lrs, reverse=True)
    assert abs(lrs[-1] - 1e-6) < 1e-12 and lrs[0] < 5e-5


def test_recorder_saves_every_n_rounds_and_the_last_in_peft_format(run_config, tmp_path):
    config = AppConfig.from_run_config({**run_config, "train.save-every-round": 2, "num-server-rounds": 3})
    recorder = RunRecorder(tmp_path / "run", config)
    state = initial_adapter(config.model, seed=1)
    metrics = {"num-examples": 5, "train-loss": 1.0, "train-seconds": 0.5, "train-tokens": 10, "partition-id": 4}
    for r in (1, 2, 3):
        state = {k: v + r for k, v in state.items()}
        recorder(RoundReport(server_round=r, arrays=ArrayRecord(state), clients=[{"node-id": r, **metrics}]))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "loss.png",
        "metrics.jsonl",
        "resume.json",
        "round-2",
        "round-3",
        "round_time.png",
        "run.json",
        "state",
        "summary.json",
        "summary.md",
    ]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(line["round"], line["checkpoint"]) for line in lines] == [(1, None), (2, "round-2"), (3, "round-3")]

    base = AutoModelForCausalLM.from_pretrained(config.model.name)
    with peft_quietly():
        loaded = PeftModel.from_pretrained(base, tmp_path / "run" / "round-3")
    torch.testing.assert_close(get_peft_model_state_dict(loaded), state)


def test_saving_over_a_checkpoint_replaces_it_whole(run_config, tmp_path):
    config = AppConfig.from_run_config(run_config)
    state = initial_adapter(config.model, seed=1)
    target = save_adapter(state, config.model, tmp_path / "round-5")
    (target / "stale.txt").write_text("left from an older save")
    save_adapter(state, config.model, tmp_path / "round-5")
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not (tmp_path / "round-5.partial").exists()


def test_gradient_checkpointing_still_trains_every_lora_factor(run_config, tmp_path):
    """Reentrant checkpointing drops the gradients of a block whose inputs need none, and
    the embedding is frozen: every LoRA factor must still learn. (On the 4-bit GPU path,
    where PEFT does not do it for us, bench/memory/reentrant_ab.txt checks the same.)"""
    config = AppConfig.from_run_config({**run_config, "model.gradient-checkpointing": True})
    tokenizer = load_tokenizer(config.model)
    data = tokenize_partition(
        load_partition(config.dataset, 1, config.train.seed), tokenizer, config.train, config.dataset, 1
    )
    model = build_model(config.model)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    before = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    train_adapter(build_trainer(model, tokenizer, data, config.train, 1e-3, 1, str(tmp_path)))
    after = get_peft_model_state_dict(model)
    unchanged = [k for k in before if "lora_B" in k and torch.equal(before[k], after[k])]
    assert unchanged == []


@pytest.mark.timeout(600)
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_compiled_layers_train_the_same_adapter_as_eager(run_config, tmp_path, checkpointing):
    """`model.compile` must be a speed setting only: the same rows from the same start give the
    same adapter, with or without checkpointing around the compiled layers. LoRA dropout is off,
    as compiled code draws its masks from another generator."""
    settings = {**run_config, "model.lora.peft-lora-dropout": 0.0, "model.gradient-checkpointing": checkpointing}
    tokenizer = load_tokenizer(AppConfig.from_run_config(settings).model)
    adapters = {}
    for compiled in (False, True):
        config = AppConfig.from_run_config({**settings, "model.compile": compiled})
        data = tokenize_partition(
            load_partition(config.dataset, 2, config.train.seed), tokenizer, config.train, config.dataset, 2
        )
        torch.manual_seed(0)
        model = build_model(config.model)
        layers = model.get_base_model().model.layers
        assert all((layer._compiled_call_impl is not None) == compiled for layer in layers)
        train_adapter(build_trainer(model, tokenizer, data, config.train, 1e-3, 1, str(tmp_path / str(compiled))))
        adapters[compiled] = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    assert any(v.abs().sum() > 0 for k, v in adapters[True].items() if "lora_B" in k)  # it trained
    torch.testing.assert_close(adapters[True], adapters[False], rtol=1e-4, atol=1e-6)
