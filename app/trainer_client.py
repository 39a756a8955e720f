"""The thin ClientApp's side of a warm trainer: pick a free one of the host, hand it the
round, wait for the adapter. No torch or transformers on this path: a ClientApp process
that trains remotely starts in a fraction of a second.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection
from pathlib import Path
from typing import Any

from app.config import AppConfig, ModelSettings, NodeSettings
from app.slots import hold_first_free
from app.trainer_protocol import AUTHKEY_FILE, Hello, lock_path, socket_path

RETRY_SECONDS = 0.2


class TrainerError(RuntimeError):
    """The trainer refused, failed or vanished; the message is one line."""


class TrainerUnavailable(TrainerError):
    """Nothing listens yet: the trainer is still loading, or being restarted."""


@dataclass(frozen=True)
class TrainerReply:
    adapter: bytes  # safetensors
    metrics: dict[str, Any]
    trainer: str
    queue_seconds: float  # waiting for a free trainer of the host
    overflow: bool  # served by another GPU's trainer because this node's own were busy


def host_trainers(trainer_dir: Path, home: str) -> tuple[list[str], int]:
    """The host's trainers, this node's own GPU's first, and how many of them are its own."""
    names = sorted(p.stem for p in trainer_dir.glob("*.lock"))
    own = [n for n in names if n.rsplit("-", 1)[0] == home]
    if not names:
        raise TrainerError(f"node config trainer-dir = {str(trainer_dir)!r}: no trainers there")
    return own + [n for n in names if n not in own], len(own)


def train_remotely(
    node: NodeSettings, config: AppConfig, server_round: int, adapter: bytes, timeout: float
) -> TrainerReply:
    """Holds a free trainer for the whole request, so each trainer serves one node at a time.

    A node's own GPU's trainers come first; when all of those are busy, any free trainer
    of the host takes the request, so that the host's GPUs share the load.
    """
    assert node.trainer_dir is not None
    names, own = host_trainers(node.trainer_dir, node.trainer_home)
    start = time.monotonic()
    locks = [lock_path(node.trainer_dir, n) for n in names]
    with hold_first_free(locks, f"trainers for {node.trainer_home}", wait_among=own or None) as held:
        name = held.stem
        queued = time.monotonic() - start
        with connect(node.trainer_dir, name, timeout) as conn:
            handshake(conn, config.model, name)
            conn.send(
                {"partition-id": node.partition_id, "server-round": server_round, "config": config, "adapter": adapter}
            )
            try:
                reply = conn.recv()
            except (EOFError, OSError) as err:
                raise TrainerError(
                    f"trainer {name} ended during the request ({err or type(err).__name__}); it is restarted"
                ) from None
    if "error" in reply:
        raise TrainerError(f"trainer {name}: {reply['error']}")
    return TrainerReply(reply["adapter"], reply["metrics"], name, queued, name.rsplit("-", 1)[0] != node.trainer_home)


def connect(trainer_dir: Path, name: str, timeout: float) -> Connection:
    """Waits for a trainer that is still starting, loading or being restarted, up to `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            key = (trainer_dir / AUTHKEY_FILE).read_bytes()
            return Client(str(socket_path(trainer_dir, name)), family="AF_UNIX", authkey=key)
        except AuthenticationError:
            raise TrainerError(f"trainer {name}: auth key mismatch ({trainer_dir / AUTHKEY_FILE})") from None
        except (FileNotFoundError, ConnectionError, EOFError):
            # No socket yet, or one whose trainer died with it (refused), or died while
            # checking our key (reset, closed): a restarted trainer will listen again.
            if time.monotonic() > deadline:
                raise TrainerUnavailable(f"trainer {name}: not listening after {timeout:.0f} s") from None
            time.sleep(RETRY_SECONDS)


def handshake(conn: Connection, model: ModelSettings | None, name: str) -> dict[str, Any]:
    """Sends our hello; the trainer answers with its status or one line refusing us."""
    conn.send(Hello.mine(model))
    try:
        answer = conn.recv()
    except (EOFError, OSError):
        raise TrainerError(f"trainer {name} closed the connection during the handshake") from None
    if "refused" in answer:
        raise TrainerError(answer["refused"])
    return answer["status"]


def ping(trainer_dir: Path, name: str, timeout: float) -> dict[str, Any]:
    """A trainer's status once it listens (model loaded), or TrainerError."""
    with connect(trainer_dir, name, timeout) as conn:
        return handshake(conn, None, name)
