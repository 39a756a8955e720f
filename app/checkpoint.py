"""Writes what a run leaves behind: the global adapter in PEFT's format and a metrics log.

Checkpoints are written to a temporary folder and renamed into place, so a crash while
saving never leaves a half-written adapter where a finished one was expected.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from logging import INFO
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save_file

from flwr.common import log

from app.config import AppConfig, ModelSettings
from app.models import lora_config
from app.report import SETTINGS_JSON, progress_line, write_plots, write_summary
from app.strategy import RoundReport

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def save_adapter(state: Mapping[str, torch.Tensor], model: ModelSettings, folder: Path) -> Path:
    """The two files `PeftModel.from_pretrained` reads; no base model needed to write them."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    lora_config(model).save_pretrained(str(partial))
    save_file({k: v.contiguous() for k, v in state.items()}, str(partial / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    if folder.exists():
        shutil.rmtree(folder)
    partial.rename(folder)
    return folder


class RunRecorder:
    """Appends one JSON line per round, saves the adapter every N rounds and at the end,
    keeps the run's report current (`app.report`) and logs one progress line a round."""

    def __init__(self, folder: Path, config: AppConfig):
        self.folder = folder
        self.model = config.model
        self.save_every = config.train.save_every_round
        self.num_rounds = config.strategy.num_rounds
        self.aggregation = "flexlora" if config.strategy.use_flexlora else "fedavg"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / SETTINGS_JSON).write_text(json.dumps(dataclasses.asdict(config), indent=1, default=str))
        self.metrics_file = folder / "metrics.jsonl"
        self._started = time.monotonic()
        self.rounds_aggregated = 0

    def __call__(self, report: RoundReport) -> None:
        self.rounds_aggregated += bool(report.clients)
        saved = None
        start = time.perf_counter()
        if report.arrays is not None and (
            report.server_round % self.save_every == 0 or report.server_round == self.num_rounds
        ):
            saved = save_adapter(report.arrays.to_torch_state_dict(), self.model, self.folder / f"round-{report.server_round}")
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
        with self.metrics_file.open("a") as f:
            f.write(json.dumps(line) + "\n")
        log(INFO, "%s", progress_line(write_summary(self.folder)))
        if report.server_round == self.num_rounds:
            write_plots([self.folder], self.folder)
