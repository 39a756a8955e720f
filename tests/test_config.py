import tomllib

import pytest

from app.config import AppConfig, ConfigError, NodeSettings
from tests.conftest import ROOT

pytestmark = pytest.mark.unit


def test_pyproject_defaults_are_the_seed_job():
    raw = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert raw["static"] == {
        "dataset": {"name": "vicgalle/alpaca-gpt4", "num-partitions": 20},
        "strategy": {"fraction-train": 0.1},
    }
    from flwr.common.config import flatten_dict

    config = AppConfig.from_run_config(flatten_dict(raw))
    assert config.model.name == "GoToCompany/gemma2-9b-cpt-sahabatai-v1-instruct"
    assert (config.model.quantization, config.model.lora.r, config.model.lora.alpha) == (4, 8, 16)
    assert (config.train.batch_size, config.train.gradient_accumulation_steps, config.train.logging_steps) == (2, 4, 1)
    assert (config.strategy.num_rounds, config.train.save_every_round, config.strategy.use_flexlora) == (10, 5, False)
    assert config.strategy.nodes_per_round(config.dataset.num_partitions) == 2
    assert config.model.gradient_checkpointing is None and config.model.attention == "eager"  # None: auto
    # The FlowerTune template's choices, so that the defaults train what the seed trained.
    assert (config.model.quantization_type, config.model.double_quantization, config.model.lora.dropout) == (
        "fp4",
        False,
        0.075,
    )
    assert (config.train.dynamic_data_seed, config.train.learn_eos, config.dataset.append_input) == (
        False,
        False,
        False,
    )
    assert config.strategy.flexlora_split == "reference"


def test_template_key_names_are_canonical():
    """A FlowerTune template user's keys for the settings it has are ours too."""
    raw = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    from flwr.common.config import flatten_dict

    keys = set(flatten_dict(raw))
    template = {
        "num-server-rounds",
        "model.name",
        "model.quantization",
        "model.gradient-checkpointing",
        "model.lora.peft-lora-r",
        "model.lora.peft-lora-alpha",
        "train.save-every-round",
        "train.learning-rate-max",
        "train.learning-rate-min",
        "train.seq-length",
        "train.training-arguments.per-device-train-batch-size",
        "train.training-arguments.gradient-accumulation-steps",
        "train.training-arguments.logging-steps",
        "train.training-arguments.max-steps",
        "static.dataset.name",
        "static.strategy.fraction-train",
    }
    assert template <= keys


@pytest.mark.parametrize(
    "key, message",
    [
        ("model.lora.r", "model.lora.r: not a setting of this app; renamed to model.lora.peft-lora-r"),
        (
            "train.batch-size",
            "train.batch-size: not a setting of this app; "
            "renamed to train.training-arguments.per-device-train-batch-size",
        ),
        (
            "strategy.fraction-train",
            "strategy.fraction-train: not a setting of this app; renamed to static.strategy.fraction-train",
        ),
        ("train.seq-lenght", "train.seq-lenght: not a setting of this app; did you mean train.seq-length?"),
        (
            "model.lora.peft-lora-rank",
            "model.lora.peft-lora-rank: not a setting of this app; did you mean model.lora.peft-lora-r?",
        ),
        (
            "train.training-arguments.num-train-epochs",
            "train.training-arguments.num-train-epochs: not a setting of this app; "
            "not a setting here: training stops after train.training-arguments.max-steps",
        ),
        ("zzz", "zzz: not a setting of this app; see [tool.flwr.app.config] in pyproject.toml"),
    ],
)
def test_unknown_or_old_keys_say_what_to_write(run_config, reliability, key, message):
    run_config[key] = 8
    with pytest.raises(ConfigError) as err:
        AppConfig.from_run_config(run_config)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)
    reliability.record("bad input", f"run config {key} = 8", f"refused: {err.value}")


@pytest.mark.parametrize("value, expected", [(True, True), (False, False), ("auto", None)])
def test_gradient_checkpointing_is_on_off_or_auto(run_config, value, expected):
    run_config["model.gradient-checkpointing"] = value
    assert AppConfig.from_run_config(run_config).model.gradient_checkpointing is expected


def test_demo_config_is_valid(run_config):
    config = AppConfig.from_run_config(run_config)
    assert config.model.is_local and config.dataset.data_files


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("model.lora.peft-lora-r", -8, "model.lora.peft-lora-r = -8: must be an integer > 0"),
        ("model.lora.peft-lora-r", 8.5, "model.lora.peft-lora-r = 8.5: must be an integer > 0"),
        ("model.quantization-type", "int4", "model.quantization-type = 'int4': must be one of fp4, nf4"),
        ("model.double-quantization", 1, "model.double-quantization = 1: must be true or false"),
        ("train.dynamic-data-seed", "yes", "train.dynamic-data-seed = 'yes': must be true or false"),
        ("strategy.flexlora-split", "sqrt", "strategy.flexlora-split = 'sqrt': must be one of reference, balanced"),
        ("strategy.wire-dtype", "float16", "strategy.wire-dtype = 'float16': must be one of bfloat16, float32"),
        ("static.strategy.fraction-train", 1.5, "static.strategy.fraction-train = 1.5: must be a number in (0, 1]"),
        ("static.strategy.fraction-train", 0.0, "static.strategy.fraction-train = 0.0: must be a number in (0, 1]"),
        ("model.quantization", 3, "model.quantization = 3: must be one of 0, 4, 8"),
        ("leaderboard", "no", "leaderboard = 'no': must be true or false"),
        ("model.quantization", "4", "model.quantization = '4': must be one of 0, 4, 8"),
        ("strategy.use-flexlora", 2, "strategy.use-flexlora = 2: must be 0 (FedAvg) or 1 (FlexLoRA)"),
        ("model.gradient-checkpointing", 1, 'model.gradient-checkpointing = 1: must be true, false or "auto"'),
        ("model.gradient-checkpointing", "on", "model.gradient-checkpointing = 'on': must be true, false or \"auto\""),
        ("model.attention", "sdpa", "model.attention = 'sdpa': must be one of eager, flex_attention"),
        ("model.compile", "yes", "model.compile = 'yes': must be true or false"),
        ("model.name", "./no/such/model", "model.name = './no/such/model': no such local model folder"),
        ("train.learning-rate-min", 1.0, "train.learning-rate-min = 1.0: must be a number in [0, 5e-05]"),
        (
            "static.strategy.fraction-train",
            0.15,
            "static.strategy.fraction-train = 0.15: a static leaderboard setting, fixed at 0.1",
        ),
        (
            "static.dataset.num-partitions",
            10,
            "static.dataset.num-partitions = 10: a static leaderboard setting, fixed at 20",
        ),
        (
            "static.dataset.name",
            "org/other",
            "static.dataset.name = 'org/other': a static leaderboard setting, fixed at 'vicgalle/alpaca-gpt4'",
        ),
    ],
)
def test_bad_values_name_key_value_and_allowed(run_config, reliability, key, value, message):
    run_config[key] = value
    with pytest.raises(ConfigError) as err:
        AppConfig.from_run_config(run_config)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)
    reliability.record("bad input", f"run config {key} = {value!r}", f"refused: {err.value}")


def test_a_run_outside_the_leaderboard_may_change_the_static_settings(run_config):
    run_config.update({"leaderboard": False, "static.strategy.fraction-train": 0.5, "static.dataset.num-partitions": 5})
    config = AppConfig.from_run_config(run_config)
    assert not config.leaderboard
    assert config.strategy.nodes_per_round(config.dataset.num_partitions) == 2


def test_data_files_are_checked_where_rows_are_read_not_by_the_server(run_config, reliability):
    """The ServerApp parses the same run config without the clients' data on its host."""
    run_config["dataset.data-files"] = "/no/such.json"
    config = AppConfig.from_run_config(run_config)
    with pytest.raises(ConfigError, match=r"^dataset.data-files = '/no/such.json': no such file on this host$") as err:
        config.dataset.check_files()
    reliability.record(
        "bad input", "run config dataset.data-files = '/no/such.json', on a node's host", f"refused: {err.value}"
    )


def test_missing_key(run_config, reliability):
    del run_config["train.training-arguments.max-steps"]
    with pytest.raises(ConfigError, match=r"^train.training-arguments.max-steps: missing from the run config$") as err:
        AppConfig.from_run_config(run_config)
    reliability.record("bad input", "run config without train.training-arguments.max-steps", f"refused: {err.value}")


@pytest.mark.parametrize(
    "node_config, message",
    [
        ({"partition-id": 20, "num-partitions": 20}, "partition-id = 20: must be an integer in [0, 19]"),
        ({"partition-id": -1, "num-partitions": 20}, "partition-id = -1: must be an integer in [0, 19]"),
        ({"partition-id": 0, "num-partitions": 10}, "num-partitions = 10: must be 20 (static.dataset.num-partitions)"),
        ({"num-partitions": 20}, "partition-id: missing from the node config"),
    ],
)
def test_bad_node_config(run_config, reliability, node_config, message):
    with pytest.raises(ConfigError) as err:
        NodeSettings.from_node_config(node_config, AppConfig.from_run_config(run_config))
    assert str(err.value) == message
    reliability.record("bad input", f"node config {node_config}", f"refused: {err.value}")


def test_good_node_config(run_config):
    node = NodeSettings.from_node_config(
        {"partition-id": 19, "num-partitions": 20}, AppConfig.from_run_config(run_config)
    )
    assert (node.partition_id, node.num_partitions, node.trainer_dir) == (19, 20, None)
    served = NodeSettings.from_node_config(
        {"partition-id": 3, "num-partitions": 20, "trainer-dir": "/trainers", "trainer-home": "gpu1"},
        AppConfig.from_run_config(run_config),
    )
    assert (str(served.trainer_dir), served.trainer_home) == ("/trainers", "gpu1")


def test_a_trainer_folder_needs_the_nodes_home(run_config, reliability):
    node_config = {"partition-id": 3, "num-partitions": 20, "trainer-dir": "/trainers"}
    with pytest.raises(ConfigError, match=r"^trainer-home: missing from the node config$") as err:
        NodeSettings.from_node_config(node_config, AppConfig.from_run_config(run_config))
    reliability.record("bad input", f"node config {node_config}", f"refused: {err.value}")
