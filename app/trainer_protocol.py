"""What a thin ClientApp and a warm trainer of its host agree on before any training.

The transport is the standard library's `multiprocessing.connection` over a Unix socket
in a folder only the host's SuperNodes and trainers share: the connection starts with an
HMAC challenge on the host's auth key, so nothing is unpickled from a peer without it.
Each connection then carries one hello and, unless the trainer refuses it, one request
and one reply. No torch here: the ClientApp side imports this.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from app.config import ModelSettings, TrainSettings

PROTOCOL = 1
AUTHKEY_FILE = "authkey"
APP_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class TrainerSpec:
    """What a GPU's supervisor (`app.trainer_service`) starts its trainers (`app.trainer`) with;
    here so that neither of the two imports the other for it."""

    trainer_dir: Path
    home: str  # gpu<g> or cpu: what a node's `trainer-home` names
    count: int  # trainers of this GPU; they share its memory
    model: ModelSettings  # loaded at start, and the only settings served
    train: TrainSettings  # the batch shape the memory plan for "auto" checkpointing assumes
    cache_partitions: int = 20


def code_version(app_dir: Path = APP_DIR) -> str:
    """A digest of the app's sources: the FAB a SuperNode runs and the trainer's installed
    copy agree only if they are the same code, whatever their version strings say."""
    digest = hashlib.sha256()
    for path in sorted(app_dir.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def trainer_home(gpu: int | None) -> str:
    """What a node's `trainer-home` and its trainers' names say: `gpu<g>`, or `cpu`."""
    return "cpu" if gpu is None else f"gpu{gpu}"


def trainer_gpu(name: str) -> int:
    """The GPU a trainer named by `trainer_name` trains on; -1 on the CPU."""
    home = name.split("-")[0]
    return int(home[3:]) if home.startswith("gpu") else -1


def trainer_name(home: str, index: int) -> str:
    """`gpu0-1`: the second trainer of GPU 0; `home` is what a node's `trainer-home` names."""
    return f"{home}-{index}"


def socket_path(trainer_dir: Path, name: str) -> Path:
    return trainer_dir / f"{name}.sock"


def lock_path(trainer_dir: Path, name: str) -> Path:
    """Held by the client a trainer is serving, so other clients pick a free one."""
    return trainer_dir / f"{name}.lock"


def ensure_authkey(trainer_dir: Path) -> bytes:
    """The host's key, made once by whichever trainer or launcher comes first.

    Written to a private temporary file and linked into place, so racing trainers all
    end up reading the one key that won.
    """
    trainer_dir.mkdir(parents=True, exist_ok=True)
    path = trainer_dir / AUTHKEY_FILE
    if not path.exists():
        partial = trainer_dir / f".{AUTHKEY_FILE}.{os.getpid()}"
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
        try:
            os.link(partial, path)
        except FileExistsError:
            pass
        finally:
            partial.unlink()
    return path.read_bytes()


@dataclass(frozen=True)
class Hello:
    """What the client runs; `model` None asks only whether the trainer is up (a ping)."""

    protocol: int
    code: str
    model: ModelSettings | None

    @classmethod
    def mine(cls, model: ModelSettings | None) -> Hello:
        return cls(PROTOCOL, code_version(), model)


def refusal(theirs: Hello, mine: Hello, trainer: str) -> str | None:
    """The one line a trainer answers a client it must not serve, naming both sides."""
    if theirs.protocol != mine.protocol:
        return (
            f"trainer {trainer} speaks protocol {mine.protocol}, this ClientApp {theirs.protocol}: run the same release"
        )
    if theirs.code != mine.code:
        return (
            f"trainer {trainer} runs app code {mine.code}, this ClientApp runs {theirs.code}: "
            "restart the trainers from the app you submit (deploy up rebuilds them)"
        )
    if theirs.model is not None and theirs.model != mine.model:
        assert mine.model is not None
        return (
            f"trainer {trainer} serves model settings [{mine.model.describe()}], this run asks for "
            f"[{theirs.model.describe()}]: restart the deployment with the run's model settings"
        )
    return None
