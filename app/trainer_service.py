"""Warm trainers of one GPU: why they exist, what they are given, and who restarts them.

Under the Deployment Engine every round is a fresh ClientApp process, and with 20 nodes
and 2 sampled a round a node trains about once in 10 rounds: caching per node cannot
help. A trainer belongs to a GPU of a host instead and serves that host's SuperNodes
over a local socket (`app.trainer_protocol`, `app.trainer`). `supervise` runs a GPU's
trainers as child processes and restarts one that dies; it imports no torch itself.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import time
from multiprocessing.connection import wait
from typing import Any

from app.trainer_protocol import TrainerSpec, ensure_authkey, lock_path, trainer_name

log = logging.getLogger(__name__)
# A trainer that dies this soon after its start, this many times in a row, cannot start.
QUICK_DEATH_SECONDS = 60
QUICK_DEATHS = 3


def _run_trainer(spec: TrainerSpec, index: int) -> None:
    """The trainer's imports (torch, transformers) happen in the child only."""
    from app import trainer

    trainer.run(spec, index)


def _stop(*_: object) -> None:
    raise SystemExit(0)


def supervise(spec: TrainerSpec) -> None:
    """Starts the GPU's trainers and restarts any that dies, until SIGTERM or SIGINT.

    A trainer that keeps dying right after its start (say, the model does not fit) ends
    the supervisor with its exit code instead of looping forever.
    """
    ensure_authkey(spec.trainer_dir)
    for index in range(spec.count):
        lock_path(spec.trainer_dir, trainer_name(spec.home, index)).touch()
    context = mp.get_context("spawn")  # CUDA must be initialised afresh in each trainer
    workers: dict[int, tuple[Any, float]] = {}
    quick: dict[int, int] = {}

    def start(index: int) -> None:
        process = context.Process(target=_run_trainer, args=(spec, index), name=trainer_name(spec.home, index))
        process.start()
        workers[index] = (process, time.monotonic())

    signal.signal(signal.SIGTERM, _stop)
    try:
        for index in range(spec.count):
            start(index)
        while True:
            ended = wait([p.sentinel for p, _ in workers.values()])
            for index, (process, started) in list(workers.items()):
                if process.sentinel not in ended:
                    continue
                process.join()
                quick[index] = quick.get(index, 0) + 1 if time.monotonic() - started < QUICK_DEATH_SECONDS else 0
                name = trainer_name(spec.home, index)
                if quick[index] >= QUICK_DEATHS:
                    log.error("trainer %s died %d times right after starting; giving up", name, quick[index])
                    raise SystemExit(process.exitcode or 1)
                log.warning(
                    "trainer %s (pid %d) exited with code %s; restarting it", name, process.pid, process.exitcode
                )
                start(index)
    finally:
        for process, _ in workers.values():
            process.terminate()
        for process, _ in workers.values():
            process.join(30)
