"""The ServerApp: samples nodes, aggregates their adapters, records every round.

It needs neither a GPU nor the base weights: the initial adapter comes from the model's
`config.json` (see `app.models.initial_adapter`) and checkpoints are plain PEFT files.
"""

from __future__ import annotations

import logging
import time
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from app.checkpoint import ResumeState, RunRecorder, save_adapter
from app.config import AppConfig, ConfigError
from app.grid import PromptGrid
from app.models import initial_adapter
from app.strategy import FedAvgOrFlexLora

app = ServerApp()


class RunFailed(RuntimeError):
    """The run ended without a result worth keeping; the message says why, in one line."""


class _OneLineRefusals(logging.Filter):
    """Flower logs any exception out of a ServerApp with its traceback. For our own
    refusals (a bad setting, a run that trained nothing) the reason is the whole story,
    so the log ends in that one line; anything else keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, (ConfigError, RunFailed)):
            record.msg, record.args = "ServerApp stopped: %s", (error,)
            record.exc_info, record.exc_text = None, None
        return True


_ONE_LINE_REFUSALS = _OneLineRefusals()


@app.main()
def main(grid: Grid, context: Context) -> None:
    logging.getLogger("flwr").addFilter(_ONE_LINE_REFUSALS)
    config = AppConfig.from_run_config(context.run_config)
    if config.resume_from is not None:
        run_dir = config.resume_from
        resumed = ResumeState.read(run_dir, config)
        initial, done = resumed.adapter, resumed.round
        log(INFO, "Resuming %s after round %d of %d", run_dir, done, config.strategy.num_rounds)
    else:
        run_dir = config.results_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-run{context.run_id}"
        resumed, done = None, 0
        initial = initial_adapter(config.model, config.train.seed)
    recorder = RunRecorder(run_dir, config, resumed)
    if resumed is None:
        save_adapter(initial, config.model, run_dir / "round-0")
    num_nodes = config.dataset.num_partitions
    per_round = config.strategy.nodes_per_round(num_nodes)
    prompt = PromptGrid(grid)
    # Round 1 samples from the whole federation if it connects in time; after that a
    # round needs only its own nodes online, so a dead node never stalls the run.
    online = prompt.wait_for_nodes(num_nodes, config.strategy.round_timeout)
    if online < num_nodes:
        log(
            WARNING,
            "%d of %d nodes online after %.0f s: sampling among those",
            online,
            num_nodes,
            config.strategy.round_timeout,
        )
    strategy = FedAvgOrFlexLora(
        use_flexlora=config.strategy.use_flexlora,
        lora_rank=config.model.lora.r,
        flexlora_split=config.strategy.flexlora_split,
        wire_dtype=config.strategy.wire_dtype,
        on_round=recorder,
        grid=prompt,
        first_round=done + 1,
        fraction_train=config.strategy.fraction_train,
        min_train_nodes=per_round,
        min_available_nodes=per_round,
    )
    strategy.start(
        grid=prompt,
        initial_arrays=ArrayRecord(initial),
        num_rounds=config.strategy.num_rounds - done,
        timeout=config.strategy.round_timeout,
        train_config=ConfigRecord(),
    )
    if recorder.rounds_aggregated == 0:
        # A run that trained nothing must not end "completed": the adapter is the initial one.
        raise RunFailed(
            f"no round aggregated an update: every client of all {config.strategy.num_rounds} rounds failed "
            f"or was rejected (reasons in {recorder.metrics_file})"
        )
