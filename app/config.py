"""The app's settings: read once from Flower's run config into frozen dataclasses.

Every module below the ServerApp and ClientApp receives these objects, never the raw
run config, so a wrong value fails here, at start, with one line that names the key,
the value and what is allowed; not twenty minutes later inside a training step.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

QUANTIZATION_BITS = (0, 4, 8)
# bitsandbytes' 4-bit kinds: the FlowerTune template's `BitsAndBytesConfig(load_in_4bit=True)` is fp4.
QUANTIZATION_TYPES = ("fp4", "nf4")
# Gemma2's logit soft-capping is exact in both; eager is faster with two trainings per GPU.
ATTENTION = ("eager", "flex_attention")
# How FlexLoRA shares the singular values between B and A (see app.aggregation).
FLEXLORA_SPLITS = ("reference", "balanced")
# What the adapter travels in (app/wire.py): bfloat16 halves the bytes, float32 sends them as trained.
WIRE_DTYPES = ("bfloat16", "float32")


class ConfigError(ValueError):
    """A setting has a value the app cannot run with; the message is one line."""


class NodeConfigError(ConfigError):
    """A node's own settings are wrong: every round would fail on that node the same way
    until it is restarted with others, so the ServerApp stops sampling it (`app.grid`)."""


# Our earlier names and the FlowerTune template's keys this app has no use for, each with
# what to write instead: a FlowerTune user's pyproject or --run-config fails on its first
# such key with a line that says where the setting went.
RENAMED = {
    "model.lora.r": "model.lora.peft-lora-r",
    "model.lora.alpha": "model.lora.peft-lora-alpha",
    "model.lora.dropout": "model.lora.peft-lora-dropout",
    "model.lora.target-modules": "model.lora.peft-lora-target-modules",
    "train.batch-size": "train.training-arguments.per-device-train-batch-size",
    "train.gradient-accumulation-steps": "train.training-arguments.gradient-accumulation-steps",
    "train.logging-steps": "train.training-arguments.logging-steps",
    "train.max-steps": "train.training-arguments.max-steps",
    "strategy.fraction-train": "static.strategy.fraction-train (a static leaderboard setting)",
}
TEMPLATE_ONLY = {
    "train.training-arguments.num-train-epochs": "training stops after train.training-arguments.max-steps",
    "train.training-arguments.learning-rate": "the round's rate follows train.learning-rate-max/-min",
    "train.training-arguments.lr-scheduler-type": "the rate is constant in a round and cosine across rounds",
    "train.training-arguments.gradient-checkpointing": "use model.gradient-checkpointing",
    "train.training-arguments.output-dir": "use results.dir",
    "train.training-arguments.save-steps": "the server saves the adapter every train.save-every-round rounds",
    "train.training-arguments.save-total-limit": "the server saves the adapter every train.save-every-round rounds",
    "strategy.fraction-evaluate": "there is no federated evaluation; use `deploy eval` on a saved adapter",
}


# The FlowerTune General NLP leaderboard's fixed settings ([tool.flwr.app.config.static]):
# a run with other values would not be comparable, whoever submitted it and however.
LEADERBOARD = {
    "static.dataset.name": "vicgalle/alpaca-gpt4",
    "static.dataset.num-partitions": 20,
    "static.strategy.fraction-train": 0.1,
}


def check_keys(run_config: Mapping[str, Any], known: set[str]) -> None:
    """Fails on the first key the app does not read, with the closest known name."""
    for key in sorted(set(run_config) - known):
        if key in RENAMED:
            hint = f"renamed to {RENAMED[key]}"
        elif key in TEMPLATE_ONLY:
            hint = f"not a setting here: {TEMPLATE_ONLY[key]}"
        else:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}?" if close else "see [tool.flwr.app.config] in pyproject.toml"
        raise ConfigError(f"{key}: not a setting of this app; {hint}")


def is_local_path(name: str) -> bool:
    """A local folder is named by a path; a hub id is `org/name` and never starts so."""
    return name.startswith(("/", "./", "../", "~"))


@dataclass(frozen=True)
class LoraSettings:
    r: int
    alpha: int
    dropout: float
    target_modules: tuple[str, ...]


@dataclass(frozen=True)
class ModelSettings:
    name: str
    quantization: int
    gradient_checkpointing: bool | None  # None: "auto", decided where the GPU is known
    lora: LoraSettings
    attention: str = "eager"
    quantization_type: str = "fp4"
    double_quantization: bool = False
    compile: bool = False

    def describe(self) -> str:
        """One line that tells two settings apart, for refusals and logs."""
        checkpointing = "auto" if self.gradient_checkpointing is None else str(self.gradient_checkpointing).lower()
        lora = self.lora
        bits = f"{self.quantization}-bit" if self.quantization else "16-bit"
        if self.quantization == 4:
            bits = f"4-bit {self.quantization_type}{' double-quant' if self.double_quantization else ''}"
        return (
            f"{self.name} {bits}, LoRA r={lora.r} alpha={lora.alpha} dropout={lora.dropout} "
            f"on {','.join(lora.target_modules)}, checkpointing={checkpointing}, attention={self.attention}"
            f"{', compiled' if self.compile else ''}"
        )

    @property
    def is_local(self) -> bool:
        return is_local_path(self.name)


@dataclass(frozen=True)
class TrainSettings:
    seq_length: int
    batch_size: int
    gradient_accumulation_steps: int
    logging_steps: int
    max_steps: int
    learning_rate_max: float
    learning_rate_min: float
    save_every_round: int
    seed: int
    max_trainings_per_gpu: int
    # FlowerTune examples' `train.dynamic-data-seed`: data_seed = seed + round - 1, so a node
    # sampled again does not start from the same rows; off, as the seed ran.
    dynamic_data_seed: bool = False
    # The template pads with EOS and masks padding, so EOS is never learned; True appends it.
    learn_eos: bool = False

    def data_seed(self, server_round: int) -> int:
        return self.seed + server_round - 1 if self.dynamic_data_seed else self.seed


@dataclass(frozen=True)
class DatasetSettings:
    name: str
    num_partitions: int
    data_files: tuple[str, ...]
    # The General NLP template keeps `instruction` and `response` only; True appends a
    # non-empty `input` to the instruction, as the template's finance and code tasks do.
    append_input: bool = False

    def check_files(self) -> None:
        """Checked where rows are read (a node's host; the deploy host of the process
        backend), not where the run config is parsed: the ServerApp never needs the data."""
        for f in self.data_files:
            if not Path(f).expanduser().is_file():
                raise ConfigError(f"dataset.data-files = {f!r}: no such file on this host")


@dataclass(frozen=True)
class StrategySettings:
    num_rounds: int
    fraction_train: float
    use_flexlora: bool
    flexlora_split: str = "reference"
    # Seconds a round waits for its replies; a node that never answers costs at most this.
    round_timeout: float = 600.0
    wire_dtype: str = "bfloat16"

    def nodes_per_round(self, num_nodes: int) -> int:
        """Flower's FedAvg samples int(fraction * available); never fewer than one."""
        return max(1, int(self.fraction_train * num_nodes))


@dataclass(frozen=True)
class AppConfig:
    model: ModelSettings
    train: TrainSettings
    dataset: DatasetSettings
    strategy: StrategySettings
    results_dir: Path
    # False: a run outside the leaderboard (another node count or fraction, e.g. a
    # consortium's own federation or a scaling benchmark) that may change static.* keys.
    leaderboard: bool = True
    # A run folder whose saved state this run continues (`deploy run --resume`); None: a new run.
    resume_from: Path | None = None

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any], local_model_here: bool = True) -> AppConfig:
        """`local_model_here`: a local model.name is a folder on this host. False where the run
        config names the containers' paths (a rendered stack): model-fetch checks it there."""
        get = _Reader(run_config)
        targets = tuple(t.strip() for t in get("model.lora.peft-lora-target-modules", str).split(",") if t.strip())
        if not targets:
            raise ConfigError(
                "model.lora.peft-lora-target-modules = '': name at least one module, e.g. 'q_proj,v_proj'"
            )
        model = ModelSettings(
            name=get("model.name", str, lambda v: bool(v.strip()), "a hub id or a local folder"),
            quantization=get("model.quantization", int, lambda v: v in QUANTIZATION_BITS, "one of 0, 4, 8"),
            gradient_checkpointing=_checkpointing(get("model.gradient-checkpointing", object)),
            lora=LoraSettings(
                r=get("model.lora.peft-lora-r", int, _positive, "an integer > 0"),
                alpha=get("model.lora.peft-lora-alpha", int, _positive, "an integer > 0"),
                dropout=get("model.lora.peft-lora-dropout", float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
                target_modules=targets,
            ),
            attention=get("model.attention", str, lambda v: v in ATTENTION, "one of " + ", ".join(ATTENTION)),
            quantization_type=get(
                "model.quantization-type",
                str,
                lambda v: v in QUANTIZATION_TYPES,
                "one of " + ", ".join(QUANTIZATION_TYPES),
            ),
            double_quantization=get("model.double-quantization", bool, allowed="true or false"),
            compile=get("model.compile", bool, allowed="true or false"),
        )
        if local_model_here and model.is_local and not (Path(model.name).expanduser() / "config.json").is_file():
            raise ConfigError(f"model.name = {model.name!r}: no such local model folder (expected a config.json in it)")
        lr_max = get("train.learning-rate-max", float, _positive, "a number > 0")
        args = "train.training-arguments."
        train = TrainSettings(
            seq_length=get("train.seq-length", int, _positive, "an integer > 0"),
            batch_size=get(args + "per-device-train-batch-size", int, _positive, "an integer > 0"),
            gradient_accumulation_steps=get(args + "gradient-accumulation-steps", int, _positive, "an integer > 0"),
            logging_steps=get(args + "logging-steps", int, _positive, "an integer > 0"),
            max_steps=get(args + "max-steps", int, _positive, "an integer > 0"),
            learning_rate_max=lr_max,
            learning_rate_min=get(
                "train.learning-rate-min", float, lambda v: 0 <= v <= lr_max, f"a number in [0, {lr_max}]"
            ),
            save_every_round=get("train.save-every-round", int, _positive, "an integer > 0"),
            seed=get("train.seed", int),
            max_trainings_per_gpu=get(
                "train.max-trainings-per-gpu", int, lambda v: v >= 0, "0 (auto) or an integer > 0"
            ),
            dynamic_data_seed=get("train.dynamic-data-seed", bool, allowed="true or false"),
            learn_eos=get("train.learn-eos", bool, allowed="true or false"),
        )
        files = _file_list(get("dataset.data-files", str))
        dataset = DatasetSettings(
            name=get("static.dataset.name", str, lambda v: bool(v.strip()), "a hub dataset id"),
            num_partitions=get("static.dataset.num-partitions", int, _positive, "an integer > 0"),
            data_files=files,
            append_input=get("dataset.append-input", bool, allowed="true or false"),
        )
        strategy = StrategySettings(
            num_rounds=get("num-server-rounds", int, _positive, "an integer > 0"),
            fraction_train=get("static.strategy.fraction-train", float, lambda v: 0 < v <= 1, "a number in (0, 1]"),
            use_flexlora=get("strategy.use-flexlora", int, lambda v: v in (0, 1), "0 (FedAvg) or 1 (FlexLoRA)") == 1,
            flexlora_split=get(
                "strategy.flexlora-split", str, lambda v: v in FLEXLORA_SPLITS, "one of " + ", ".join(FLEXLORA_SPLITS)
            ),
            round_timeout=get("strategy.round-timeout", float, lambda v: 0 < v <= 86400, "seconds in (0, 86400]"),
            wire_dtype=get("strategy.wire-dtype", str, lambda v: v in WIRE_DTYPES, "one of " + ", ".join(WIRE_DTYPES)),
        )
        results_dir = Path(get("results.dir", str)).expanduser()
        leaderboard = get("leaderboard", bool, allowed="true or false")
        resume_from = get("results.resume-from", str).strip()
        check_keys(run_config, get.read)
        for key, fixed in LEADERBOARD.items():
            if leaderboard and run_config[key] != fixed:
                raise ConfigError(
                    f"{key} = {run_config[key]!r}: a static leaderboard setting, fixed at {fixed!r} "
                    "(leaderboard=false allows it, for a run outside the leaderboard)"
                )
        return cls(
            model,
            train,
            dataset,
            strategy,
            results_dir,
            leaderboard,
            Path(resume_from).expanduser() if resume_from else None,
        )


@dataclass(frozen=True)
class NodeSettings:
    partition_id: int
    num_partitions: int
    lock_dir: Path | None  # shared by the host's nodes for GPU admission; None: no limit
    # Where the host's warm trainers listen, and which of them are this node's own (its
    # GPU's); None: the ClientApp trains in its own process.
    trainer_dir: Path | None = None
    trainer_home: str = ""
    # This site's copy of the data (node config `data-files`); empty: the run config's.
    data_files: tuple[str, ...] = ()

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any], app: AppConfig) -> NodeSettings:
        get = _Reader(node_config, source="node config", error=NodeConfigError)
        expected = app.dataset.num_partitions
        num = get("num-partitions", int, lambda v: v == expected, f"{expected} (static.dataset.num-partitions)")
        pid = get("partition-id", int, lambda v: 0 <= v < num, f"an integer in [0, {num - 1}]")
        lock_dir = get("lock-dir", str) if "lock-dir" in node_config else None
        trainer_dir = get("trainer-dir", str) if "trainer-dir" in node_config else None
        home = get("trainer-home", str, lambda v: bool(v), "a trainer name such as gpu0") if trainer_dir else ""
        files = _file_list(get("data-files", str)) if "data-files" in node_config else ()
        return cls(
            partition_id=pid,
            num_partitions=num,
            lock_dir=Path(lock_dir) if lock_dir else None,
            trainer_dir=Path(trainer_dir) if trainer_dir else None,
            trainer_home=home,
            data_files=files,
        )

    def own_data(self, app: AppConfig) -> AppConfig:
        """The run config with this node's own copy of the data, where its node config names one."""
        if not self.data_files:
            return app
        return replace(app, dataset=replace(app.dataset, data_files=self.data_files))


def _checkpointing(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if value == "auto":
        return None
    raise ConfigError(
        f'model.gradient-checkpointing = {value!r}: must be true, false or "auto" '
        "(off when the trainings placed on a GPU fit without it)"
    )


def _file_list(value: str) -> tuple[str, ...]:
    return tuple(f.strip() for f in value.split(",") if f.strip())


def _positive(value: float) -> bool:
    return value > 0 and math.isfinite(value)


class _Reader:
    """Fetches one typed value, turning every problem into a one-line ConfigError."""

    def __init__(self, config: Mapping[str, Any], source: str = "run config", error: type[ConfigError] = ConfigError):
        self._config = config
        self._error = error
        self._source = source
        self.read: set[str] = set()  # every key asked for: the app's known keys

    def __call__(
        self,
        key: str,
        kind: type,
        check: Callable[[Any], bool] = lambda _: True,
        allowed: str = "",
    ) -> Any:
        self.read.add(key)
        if key not in self._config:
            raise self._error(f"{key}: missing from the {self._source}")
        value = self._config[key]
        typed = _coerce(value, kind)
        if typed is None:
            raise self._error(f"{key} = {value!r}: must be {allowed or 'a ' + kind.__name__}")
        if not check(typed):
            raise self._error(f"{key} = {value!r}: must be {allowed}")
        return typed


def _coerce(value: Any, kind: type) -> Any:
    """TOML and --node-config give ints, floats, bools or strings; accept only lossless matches."""
    if kind is object:  # the caller checks the value itself
        return value
    if kind is bool:
        return value if isinstance(value, bool) else None
    if isinstance(value, bool):
        return None
    if kind is int:
        return value if isinstance(value, int) else None
    if kind is float:
        return float(value) if isinstance(value, (int, float)) else None
    return value if isinstance(value, kind) else None
