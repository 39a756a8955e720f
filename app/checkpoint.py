"""Writes what a run leaves behind: the global adapter in PEFT's format and a metrics log.

Checkpoints are written to a temporary folder and renamed into place, so a crash while
saving never leaves a half-written adapter where a finished one was expected.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save_file

from app.config import ModelSettings
from app.models import lora_config
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
    """Appends one JSON line per round and saves the adapter every N rounds and at the end."""

    def __init__(self, folder: Path, model: ModelSettings, save_every: int, num_rounds: int, aggregation: str):
        self.folder = folder
        self.model = model
        self.save_every = save_every
        self.num_rounds = num_rounds
        self.aggregation = aggregation
        folder.mkdir(parents=True, exist_ok=True)
        self.metrics_file = folder / "metrics.jsonl"
        self._started = time.monotonic()

    def __call__(self, report: RoundReport) -> None:
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
