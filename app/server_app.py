"""The ServerApp: samples nodes, aggregates their adapters, records every round.

It needs neither a GPU nor the base weights: the initial adapter comes from the model's
`config.json` (see `app.models.initial_adapter`) and checkpoints are plain PEFT files.
"""

from __future__ import annotations

import time
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from app.checkpoint import ResumeState, RunRecorder, save_adapter
from app.config import AppConfig
from app.grid import PromptGrid
from app.models import initial_adapter
from app.strategy import FedAvgOrFlexLora

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
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
        log(WARNING, "%d of %d nodes online after %.0f s: sampling among those", online, num_nodes, config.strategy.round_timeout)
    strategy = FedAvgOrFlexLora(
        use_flexlora=config.strategy.use_flexlora,
        lora_rank=config.model.lora.r,
        flexlora_split=config.strategy.flexlora_split,
        on_round=recorder,
        node_of=prompt.node_of,
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
        raise RuntimeError(
            f"no round aggregated an update: every client of all {config.strategy.num_rounds} rounds failed "
            f"or was rejected (reasons in {recorder.metrics_file})"
        )
