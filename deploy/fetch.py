"""Fills a host's Hugging Face cache with the model and the dataset once, before any node starts.

Otherwise the first round's sampled clients (or a GPU's trainers) would download the same
18.5 GB and the same dataset in parallel. Compose's `model-fetch` service and the process
backend both call `fetch`; a local model folder or local data files need nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from app.config import AppConfig, ConfigError


def fetch(config: AppConfig) -> list[str]:
    """What was fetched or found, one line each, for the service's log."""
    lines = []
    if config.model.is_local:
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
