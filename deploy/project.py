"""The app's run config as `flwr run` will see it: pyproject defaults plus overrides.

Validated here, before anything starts, with the same `AppConfig` the apps use; so a
bad value stops the deploy tool with the app's own one-line message and a non-zero exit,
not as a failed run twenty SuperNodes later.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.common.config import flatten_dict, parse_config_args

from app.config import AppConfig, ConfigError, is_local_path


def parse_overrides(text: str | None) -> dict[str, Any]:
    """`--run-config` text (or a .toml file) as a dict, with one line for what Flower's
    parser rejects; the values themselves are checked by `resolve_run_config`."""
    if not text:
        return {}
    try:
        return parse_config_args([text])
    except Exception:  # click's ClickException, a TOML error: the text is not key=value pairs
        raise ConfigError(
            f"--run-config {text!r}: expected space-separated key=value pairs; "
            'strings need quotes, e.g. model.name="org/model" model.lora.peft-lora-alpha=16'
        ) from None


def default_run_config(app_dir: Path) -> dict[str, Any]:
    pyproject = tomllib.loads((app_dir / "pyproject.toml").read_text())
    return flatten_dict(pyproject["tool"]["flwr"]["app"]["config"])


def resolve_run_config(
    app_dir: Path, overrides: Mapping[str, Any], local_model_here: bool = True
) -> tuple[dict[str, Any], AppConfig]:
    """Returns only the overrides to send (relative paths made absolute) and the checked config.

    The ServerApp and ClientApps run in other working directories (or containers), so
    local paths are resolved against the app folder here, once.
    """
    defaults = default_run_config(app_dir)
    sent = dict(overrides)
    merged = {**defaults, **sent}

    def absolute(path: str) -> str:
        return str((app_dir / Path(path).expanduser()).resolve())

    sent["results.dir"] = absolute(str(merged["results.dir"]))
    if str(merged.get("results.resume-from", "")).strip():
        sent["results.resume-from"] = absolute(str(merged["results.resume-from"]))
    if is_local_path(str(merged["model.name"])):
        sent["model.name"] = absolute(str(merged["model.name"]))
    if merged["dataset.data-files"]:
        sent["dataset.data-files"] = ",".join(absolute(f.strip()) for f in str(merged["dataset.data-files"]).split(","))
    return sent, AppConfig.from_run_config({**defaults, **sent}, local_model_here)
