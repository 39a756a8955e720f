"""Shared fixtures: the tiny embedded Gemma2 and Alpaca data, built once per session."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from flwr.common.config import flatten_dict

from deploy.demo import DemoAssets, build_demo

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoAssets:
    return build_demo(tmp_path_factory.mktemp("demo"))


@pytest.fixture()
def run_config(demo: DemoAssets, tmp_path: Path) -> dict:
    """pyproject's run config pointed at the tiny model: what a real run would read."""
    config = flatten_dict(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    return {**config, **demo.run_config(), "results.dir": str(tmp_path / "results")}
