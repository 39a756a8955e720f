"""A real warm trainer (the `deploy trainer` supervisor and its child) on the tiny model:
the handshake, model and partition reuse, and a trainer killed in the middle of a request."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from app.config import AppConfig, NodeSettings
from app.models import initial_adapter
from app.trainer_client import TrainerError, connect, ping, train_remotely
from app.trainer_protocol import PROTOCOL, Hello, code_version
from app.wire import decode, encode
from deploy.flwr_cli import write_run_config
from deploy.project import resolve_run_config
from tests.conftest import ROOT

pytestmark = pytest.mark.unit

NAME = "cpu-0"


@pytest.fixture(scope="module")
def trainer(demo, tmp_path_factory):
    """One CPU trainer that keeps at most two tokenized partitions."""
    folder = tmp_path_factory.mktemp("trainer")
    sent, config = resolve_run_config(ROOT, demo.run_config())
    log_path = folder / "trainer.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "deploy",
                "--app",
                str(ROOT),
                "trainer",
                "--dir",
                str(folder / "sockets"),
                "--home",
                "cpu",
                "--count",
                "1",
                "--cache-partitions",
                "2",
                "--run-config",
                str(write_run_config(folder / "run-config.toml", sent)),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
            start_new_session=True,
        )
    try:
        ping(folder / "sockets", NAME, timeout=180)
        yield folder / "sockets", config, log_path
    finally:
        process.terminate()
        assert process.wait(60) == 0  # SIGTERM stops the supervisor and its trainers cleanly


def request(trainer_dir: Path, config: AppConfig, partition_id: int, server_round: int = 1):
    node = NodeSettings(partition_id, 20, None, trainer_dir, "cpu")
    adapter = encode(initial_adapter(config.model, config.train.seed), config.strategy.wire_dtype)
    return train_remotely(node, config, server_round, adapter, timeout=180)


def test_a_request_trains_the_adapter_it_is_sent(trainer):
    trainer_dir, config, _ = trainer
    reply = request(trainer_dir, config, 3)
    sent = decode(encode(initial_adapter(config.model, config.train.seed), "bfloat16"), "bfloat16")
    got = decode(reply.adapter, "bfloat16")  # refuses a reply in any other dtype than the wire's
    assert got.keys() == sent.keys() and any((got[k] != sent[k]).any() for k in got)
    assert reply.trainer == NAME and not reply.overflow
    assert reply.metrics["num-examples"] == 20 and reply.metrics["train-loss"] > 0


def test_the_model_loads_once_and_the_partition_cache_is_bounded(trainer):
    trainer_dir, config, _ = trainer
    before = ping(trainer_dir, NAME, timeout=10)
    replies = [request(trainer_dir, config, p).metrics for p in (10, 11, 10, 12, 10)]
    assert {m["trainer-pid"] for m in replies} == {before["pid"]}
    assert {m["trainer-model-loads"] for m in replies} == {1}
    loads = [m["trainer-partition-loads"] - replies[0]["trainer-partition-loads"] for m in replies]
    # 10 and 11 cached; 10 again is a hit; 12 evicts 11 (least recent); 10 is still a hit.
    assert loads == [0, 1, 1, 2, 2]


def test_other_code_or_other_model_settings_are_refused_with_both_versions(trainer, reliability):
    trainer_dir, config, _ = trainer
    with connect(trainer_dir, NAME, timeout=10) as conn:
        conn.send(Hello(PROTOCOL, "0123456789ab", config.model))
        refused = conn.recv()["refused"]
    assert refused == (
        f"trainer {NAME} runs app code {code_version()}, this ClientApp runs 0123456789ab: "
        "restart the trainers from the app you submit (deploy up rebuilds them)"
    )
    other = replace(config, model=replace(config.model, lora=replace(config.model.lora, r=4)))
    with pytest.raises(TrainerError) as err:
        request(trainer_dir, other, 0)
    message = str(err.value)
    assert message.startswith(f"trainer {NAME} serves model settings [") and "\n" not in message
    assert "LoRA r=8 " in message and "this run asks for [" in message and "LoRA r=4 " in message
    reliability.record("bad input", "a ClientApp of other app code asks a warm trainer", f"refused: {refused}")
    reliability.record("bad input", "a run with LoRA r=4 asks a warm trainer loaded with r=8", f"refused: {message}")


def test_a_trainer_killed_mid_request_fails_that_request_and_comes_back(trainer, reliability):
    trainer_dir, config, log_path = trainer
    victim = ping(trainer_dir, NAME, timeout=10)["pid"]
    slow = replace(config, train=replace(config.train, max_steps=2000))
    outcome: list[BaseException | object] = []

    def run() -> None:
        try:
            outcome.append(request(trainer_dir, slow, 7, server_round=2))
        except BaseException as err:  # noqa: BLE001 - handed to the test thread
            outcome.append(err)

    client = threading.Thread(target=run)
    client.start()
    marker = f"(pid {victim}): round 2, partition 7: training"
    deadline = time.monotonic() + 120
    while marker not in log_path.read_text():
        assert time.monotonic() < deadline, "the trainer never started the request"
        time.sleep(0.1)
    os.kill(victim, signal.SIGKILL)
    client.join(60)
    assert not client.is_alive()
    (error,) = outcome
    assert isinstance(error, TrainerError) and "ended during the request" in str(error)

    after = ping(trainer_dir, NAME, timeout=180)  # the supervisor restarted it
    assert after["pid"] != victim and after["model-loads"] == 1
    assert f"trainer {NAME} (pid {victim}) exited with code -9; restarting it" in log_path.read_text()
    assert request(trainer_dir, config, 7).metrics["trainer-pid"] == after["pid"]
    reliability.record(
        "fault",
        "a warm trainer SIGKILLed in the middle of a request",
        f"that request failed: {error}; the supervisor restarted the trainer, which loaded the model "
        f"{after['model-loads']} time and trained the next request",
    )
