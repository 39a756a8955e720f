"""Fills a host's Hugging Face cache with the model and the dataset once, before any node starts.

Otherwise the first round's sampled clients (or a GPU's trainers) would download the same
18.5 GB and the same dataset in parallel. Compose's `model-fetch` service and the process
backend both call `fetch`; a local model folder or local data files need nothing.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from app.config import AppConfig, ConfigError


def check_readable(folder: Path, uid: int, gids: list[int]) -> None:
    """Refuse a model folder whose files `uid` cannot read. transformers' `save_pretrained`
    writes weights 0600, so a model saved as root and mounted into the containers (uid 1000)
    fails only when the trainers load it, as a FileNotFoundError from safetensors that names
    no permission; here it is one line before anything starts. Mode bits, not os.access, so
    that the check means the same for root (who reads anything) asking on behalf of uid 1000."""
    paths = [folder, *sorted(folder.rglob("*"))]
    unreadable = [p for p in paths if p.exists() and not _readable(p.stat(), uid, gids)]
    if unreadable:
        raise ConfigError(
            f"model.name = {str(folder)!r}: {unreadable[0].relative_to(folder)} is not readable by uid {uid} "
            f"({len(unreadable)} of its files or folders); on the host: chmod -R a+rX <the model folder>"
        )


def _readable(st: os.stat_result, uid: int, gids: list[int]) -> bool:
    need = (stat.S_IRUSR | stat.S_IXUSR) if stat.S_ISDIR(st.st_mode) else stat.S_IRUSR
    if uid == 0:
        return True
    shift = 0 if st.st_uid == uid else 3 if st.st_gid in gids else 6
    return st.st_mode & (need >> shift) == need >> shift


def fetch(config: AppConfig) -> list[str]:
    """What was fetched or found, one line each, for the service's log."""
    lines = []
    if config.model.is_local:
        check_readable(Path(config.model.name), os.getuid(), [os.getgid(), *os.getgroups()])
        lines.append(f"{config.model.name}: local model, nothing to fetch")
    else:
        from huggingface_hub import snapshot_download

        try:
            path = snapshot_download(config.model.name, allow_patterns=["*.json", "*.safetensors", "*.model"])
        except Exception as err:  # an invalid id, no such repo, no network, no access: all end here
            reason = " ".join(str(err).split())[:200]
            raise ConfigError(
                f"model.name = {config.model.name!r}: not a local folder (write ./path or /path) and not fetched "
                f"from the hub: {type(err).__name__}: {reason}"
            ) from None
        lines.append(f"{config.model.name}: cached at {path}")
    from app.dataset import load_partition

    # Loading one partition downloads and prepares the whole split into the datasets cache,
    # and checks its rows: bad data stops `deploy run` before anything starts.
    with _datasets_quietly():
        rows = load_partition(config.dataset, 0, config.train.seed).num_rows
    source = ",".join(config.dataset.data_files) or config.dataset.name
    lines.append(f"{source}: cached ({rows} rows in partition 0 of {config.dataset.num_partitions})")
    return lines


@contextmanager
def _datasets_quietly() -> Iterator[None]:
    """Our line says what was loaded, or why not, in one line; datasets' progress bars and
    its own error log would put more lines around it."""
    from datasets.utils import logging as datasets_logging

    bars, level = datasets_logging.is_progress_bar_enabled(), datasets_logging.get_verbosity()
    datasets_logging.disable_progress_bar()
    datasets_logging.set_verbosity(datasets_logging.CRITICAL)
    try:
        yield
    finally:
        datasets_logging.set_verbosity(level)
        if bars:
            datasets_logging.enable_progress_bar()
