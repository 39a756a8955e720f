"""Writes what a run leaves behind: the global adapter in PEFT's format, a metrics log,
and after every round the state a resumed run continues from.

Everything is written durably (`app.durable`): a crash or power loss at any moment leaves
the previous checkpoint or the new one, never half of one, never neither.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord
from flwr.common import log
from safetensors.torch import load_file, save_file

from app.config import AppConfig, ConfigError, ModelSettings
from app.durable import append_line, fsync_path, replace_folder, write_durably
from app.models import lora_config
from app.report import (
    METRICS_JSONL,
    RESUME_JSON,
    SETTINGS_JSON,
    progress_line,
    read_metrics,
    write_plots,
    write_summary,
)
from app.strategy import RoundReport

ADAPTER_WEIGHTS = "adapter_model.safetensors"


STATE_DIR = "state"  # state/round-<k>: the global adapter after round k, for a resumed run


def save_adapter(state: Mapping[str, torch.Tensor], model: ModelSettings, folder: Path) -> Path:
    """The two files `PeftModel.from_pretrained` reads; no base model needed to write them."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    lora_config(model).save_pretrained(str(partial))
    save_file({k: v.contiguous() for k, v in state.items()}, str(partial / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    for path in (*partial.iterdir(), partial):
        fsync_path(path)
    replace_folder(partial, folder)
    return folder


def write_json(path: Path, data: Mapping) -> None:
    write_durably(path, json.dumps(data, indent=1, default=str).encode())


@dataclass(frozen=True)
class ResumeState:
    """Where a run stood after its last completed round."""

    round: int
    adapter: dict[str, torch.Tensor]
    elapsed_seconds: float
    rounds_aggregated: int
    metrics_dropped: str | None = None  # the line that says metrics.jsonl's cut last line is left out

    @classmethod
    def read(cls, run_dir: Path, config: AppConfig) -> ResumeState:
        """The state `RunRecorder` left, checked against the settings that continue it; its
        metrics file is checked first, so that one damaged beyond a cut last line stops the
        run before anything starts (`deploy run --resume` reads this before starting)."""
        where = f"results.resume-from = '{run_dir}'"
        if not (run_dir / RESUME_JSON).is_file():
            raise ConfigError(f"{where}: no {RESUME_JSON} there (a run folder writes it after its first round)")
        metrics = read_metrics(run_dir)
        state = json.loads((run_dir / RESUME_JSON).read_text())
        before = json.loads((run_dir / SETTINGS_JSON).read_text())
        now = json.loads(json.dumps(dataclasses.asdict(config), default=str))
        for section in ("model", "train", "dataset"):
            if before[section] != now[section]:
                key = next(k for k in now[section] if before[section].get(k) != now[section][k])
                raise ConfigError(
                    f"{where}: that run used {section}.{key} = {before[section].get(key)!r}, this one "
                    f"{now[section][key]!r}; resume with the same settings"
                )
        if state["round"] >= config.strategy.num_rounds:
            raise ConfigError(
                f"{where}: it completed {state['round']} rounds, num-server-rounds = {config.strategy.num_rounds}; "
                "raise num-server-rounds to train on"
            )
        adapter = load_file(str(run_dir / STATE_DIR / f"round-{state['round']}" / ADAPTER_WEIGHTS))
        return cls(state["round"], adapter, state["elapsed-seconds"], state["rounds-aggregated"], metrics.dropped)


class RunRecorder:
    """Appends one JSON line per round, saves the adapter every N rounds and at the end,
    keeps the run's report current (`app.report`) and logs one progress line a round."""

    def __init__(self, folder: Path, config: AppConfig, resumed: ResumeState | None = None):
        self.folder = folder
        self.model = config.model
        self.save_every = config.train.save_every_round
        self.num_rounds = config.strategy.num_rounds
        self.aggregation = "flexlora" if config.strategy.use_flexlora else "fedavg"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            write_json(folder / SETTINGS_JSON, dataclasses.asdict(config))
        except OSError as err:  # deploy checks it first; a ServerApp started otherwise says it here
            raise ConfigError(
                f"results.dir = '{config.results_dir}': cannot write the run folder there ({err.strerror})"
            ) from None
        self.metrics_file = folder / METRICS_JSONL
        # A resumed run's clock and count go on from where the state left them.
        self._started = time.monotonic() - (resumed.elapsed_seconds if resumed else 0.0)
        self.rounds_aggregated = resumed.rounds_aggregated if resumed else 0
        if resumed:
            self._drop_rounds_after(resumed.round)

    def _drop_rounds_after(self, last: int) -> None:
        """Lines of a round whose state was never saved (the server died in between) go, and
        so does a cut last line, which the next append would otherwise run on from: the
        resumed run trains that round again."""
        metrics = read_metrics(self.folder)
        kept = [r for r in metrics.rounds if r["round"] <= last]
        if metrics.dropped:
            log(WARNING, "%s", metrics.dropped)
        if metrics.dropped or len(kept) != len(metrics.rounds):
            write_durably(self.metrics_file, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def save_state(self, server_round: int, arrays: ArrayRecord) -> None:
        """After every round: the adapter, then resume.json pointing at it, then the older one goes."""
        state_dir = self.folder / STATE_DIR
        save_adapter(arrays.to_torch_state_dict(), self.model, state_dir / f"round-{server_round}")
        write_json(
            self.folder / RESUME_JSON,
            {
                "round": server_round,
                "elapsed-seconds": round(time.monotonic() - self._started, 3),
                "rounds-aggregated": self.rounds_aggregated,
            },
        )
        for older in state_dir.glob("round-*"):
            if older.name != f"round-{server_round}":
                shutil.rmtree(older, ignore_errors=True)

    def __call__(self, report: RoundReport) -> None:
        self.rounds_aggregated += bool(report.clients)
        saved = None
        start = time.perf_counter()
        if report.arrays is not None and (
            report.server_round % self.save_every == 0 or report.server_round == self.num_rounds
        ):
            saved = save_adapter(
                report.arrays.to_torch_state_dict(), self.model, self.folder / f"round-{report.server_round}"
            )
        line = {
            "round": report.server_round,
            "aggregation": self.aggregation,
            "aggregated": bool(report.clients),
            "clients": report.clients,
            "rejected": report.rejected,
            "failed": report.failed,
            "aggregate": report.aggregate,
            "aggregate-seconds": round(report.aggregate_seconds, 3),
            "checkpoint": saved.name if saved else None,
            "checkpoint-seconds": round(time.perf_counter() - start, 3),
            "elapsed-seconds": round(time.monotonic() - self._started, 3),
        }
        append_line(self.metrics_file, json.dumps(line))
        if report.arrays is not None:
            self.save_state(report.server_round, report.arrays)
        log(INFO, "%s", progress_line(write_summary(self.folder)))
        if report.server_round == self.num_rounds:
            write_plots([self.folder], self.folder)
