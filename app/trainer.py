"""One warm trainer process: the model loaded once, requests served one at a time.

It keeps the model, the tokenizer and the tokenized partitions it has seen; for each
request it sets the adapter it is sent, trains with a fresh optimizer (a new Trainer)
and returns the new adapter. It reads only the data files its own host's run config
names, so no data crosses hosts.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing as mp
import os
import time
from collections import OrderedDict
from multiprocessing.connection import Connection, Listener
from typing import Any

import torch

from app.config import AppConfig
from app.dataset import checked_partition, federated_dataset, tokenize_partition
from app.gpu_admission import check_fits, resolve_checkpointing, visible_gpu_bytes
from app.models import build_model, load_tokenizer
from app.train import train_round
from app.trainer_protocol import Hello, TrainerSpec, ensure_authkey, refusal, socket_path, trainer_name
from app.wire import decode, encode

log = logging.getLogger(__name__)


class Trainer:
    """One process's model and caches; `serve` answers requests until the process ends."""

    def __init__(self, spec: TrainerSpec, index: int):
        self.spec = spec
        self.name = trainer_name(spec.home, index)
        gpu_bytes = visible_gpu_bytes()
        resolved = resolve_checkpointing(spec.model, spec.train, spec.count, gpu_bytes)
        check_fits(resolved, spec.train, spec.count, gpu_bytes)
        start = time.perf_counter()
        self.model = build_model(resolved)
        self.tokenizer = load_tokenizer(resolved)
        self.model_loads = 1
        self.partition_loads = 0
        log.info(
            "trainer %s (pid %d): loaded %s in %.1f s (gradient checkpointing %s)",
            self.name,
            os.getpid(),
            resolved.name,
            time.perf_counter() - start,
            "on" if resolved.gradient_checkpointing else "off",
        )
        self._datasets: dict[Any, Any] = {}
        self._partitions: OrderedDict[Any, tuple[int, Any]] = OrderedDict()

    def status(self) -> dict[str, Any]:
        return {"trainer": self.name, "pid": os.getpid(), "model-loads": self.model_loads}

    def partition(self, config: AppConfig, partition_id: int) -> tuple[int, Any]:
        """(rows, tokenized rows); the least recently used partition leaves a full cache."""
        key = (config.dataset, config.train.seed, config.train.seq_length, config.train.learn_eos, partition_id)
        if key in self._partitions:
            self._partitions.move_to_end(key)
            return self._partitions[key]
        split = (config.dataset, config.train.seed)
        if split not in self._datasets:
            self._datasets = {split: federated_dataset(config.dataset, config.train.seed)}
        rows = checked_partition(self._datasets[split], config.dataset, partition_id)
        data = tokenize_partition(rows, self.tokenizer, config.train, config.dataset, partition_id)
        self._partitions[key] = (len(rows), data)
        self.partition_loads += 1
        while len(self._partitions) > self.spec.cache_partitions:
            self._partitions.popitem(last=False)
        return self._partitions[key]

    def train(self, request: dict[str, Any]) -> dict[str, Any]:
        config: AppConfig = request["config"]
        pid, server_round = request["partition-id"], request["server-round"]
        start = time.perf_counter()
        rows, data = self.partition(config, pid)
        prepared = time.perf_counter() - start
        log.info("trainer %s (pid %d): round %d, partition %d: training", self.name, os.getpid(), server_round, pid)
        state, metrics = train_round(
            self.model,
            self.tokenizer,
            data,
            config,
            server_round,
            decode(request["adapter"], config.strategy.wire_dtype),
        )
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # what this request used goes back to the GPU's other trainers
        log.info(
            "trainer %s: round %d, partition %d: loss %.4f, %.1f s",
            self.name,
            server_round,
            pid,
            metrics["train-loss"],
            metrics["train-seconds"],
        )
        return {
            "adapter": encode(state, config.strategy.wire_dtype),
            "metrics": {
                **metrics,
                "num-examples": rows,
                "rows-without-label": rows - len(data),
                "prepare-seconds": prepared,
                "trainer-pid": os.getpid(),
                "trainer-model-loads": self.model_loads,
                "trainer-partition-loads": self.partition_loads,
            },
        }

    def serve(self) -> None:
        key = ensure_authkey(self.spec.trainer_dir)
        path = socket_path(self.spec.trainer_dir, self.name)
        path.unlink(missing_ok=True)  # left behind by a predecessor that was killed
        with Listener(str(path), family="AF_UNIX", authkey=key) as listener:
            log.info("trainer %s (pid %d): listening on %s", self.name, os.getpid(), path)
            while True:
                try:
                    conn = listener.accept()
                except (OSError, EOFError, mp.AuthenticationError) as err:
                    log.warning("trainer %s: refused a connection: %s", self.name, err or type(err).__name__)
                    continue
                with conn:
                    self._answer(conn)

    def _answer(self, conn: Connection) -> None:
        try:
            hello = conn.recv()
            mine = Hello.mine(self.spec.model)
            problem = refusal(hello, mine, self.name) if isinstance(hello, Hello) else "expected a hello"
            if problem:
                log.warning("%s", problem)
                conn.send({"refused": problem})
                return
            conn.send({"status": self.status()})
            if hello.model is None:
                return  # a ping
            request = conn.recv()
            try:
                reply = self.train(request)
            except Exception as err:  # the node gets the reason; the trainer keeps serving
                log.exception("trainer %s: request failed", self.name)
                reply = {"error": f"{type(err).__name__}: {err}"}
            conn.send(reply)
        except (EOFError, OSError) as err:
            log.warning("trainer %s: the client went away: %s", self.name, err or type(err).__name__)


def run(spec: TrainerSpec, index: int) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    Trainer(spec, index).serve()
