"""Shared fixtures: the tiny embedded Gemma2 and Alpaca data, built once per session."""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from flwr.common.config import flatten_dict

from deploy.demo import DemoAssets, build_demo

# the `reliability` fixture and the record behind docs/reliability.md; one tier mark per test
pytest_plugins = ["tests.reliability", "tests.tiers"]

ROOT = Path(__file__).resolve().parents[1]
BASE_IMAGE = "flowertune-base:bookworm"  # made by tests/docker/make_base_image.sh


def _docker_missing() -> str | None:
    """What the Docker tests lack on this machine, or None."""
    if shutil.which("docker") is None:
        return "the docker CLI"
    for what, command in (
        ("a running engine", ["docker", "info"]),
        ("Compose v2", ["docker", "compose", "version"]),
        (f"the base image {BASE_IMAGE}", ["docker", "image", "inspect", BASE_IMAGE]),
    ):
        if subprocess.run(command, capture_output=True).returncode != 0:
            return what
    return None


@pytest.fixture(scope="session")
def docker_engine() -> str:
    """A Docker engine, Compose v2 and the local base image, installed here when missing, so
    README's test command passes on a fresh machine as it is (the scripts are idempotent)."""
    missing = _docker_missing()
    if missing is not None:
        if os.geteuid() != 0:
            pytest.fail(
                f"the Docker tests need {missing}: run `sudo bash tests/docker/install_engine.sh && "
                "sudo bash tests/docker/make_base_image.sh` once, or run the tests as root"
            )
        for script in ("install_engine.sh", "make_base_image.sh"):
            subprocess.run(["bash", str(ROOT / "tests" / "docker" / script)], check=True)
        assert _docker_missing() is None, _docker_missing()
    return BASE_IMAGE


def assert_adapter_trained(demo: DemoAssets, run_dir: Path, final_round: int) -> None:
    """The last checkpoint loads with PEFT on the tiny base and moved away from round 0."""
    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from app.models import peft_quietly

    base = AutoModelForCausalLM.from_pretrained(demo.model_dir)
    with peft_quietly():
        final = get_peft_model_state_dict(PeftModel.from_pretrained(base, run_dir / f"round-{final_round}"))
    initial = load_file(run_dir / "round-0" / "adapter_model.safetensors")
    assert final.keys() == initial.keys()
    assert any(not torch.equal(final[k], initial[k]) for k in final)


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoAssets:
    return build_demo(tmp_path_factory.mktemp("demo"))


@pytest.fixture()
def run_config(demo: DemoAssets, tmp_path: Path) -> dict:
    """pyproject's run config pointed at the tiny model: what a real run would read."""
    config = flatten_dict(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    return {**config, **demo.run_config(), "results.dir": str(tmp_path / "results")}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak-rounds",
        type=int,
        default=10,
        help="rounds of the soak test (CI's short form: 10; the full soak: 20)",
    )
    parser.addoption(
        "--engines",
        action="store_true",
        help=f"also run {ENGINE_TESTS}: kits and a swarm on three separate engines (root; docs/development.md)",
    )


# Three engines, 20 SuperNode containers, runs across them: too heavy for every run of the 2-core CI
# machine. A run of the folder leaves the file uncollected without --engines (pytest does not ask
# this hook about a path named on the command line), rather than deselected or skipped, so a
# default run stays a whole run of the suite (tests/reliability.py) with no marker beyond the tiers.
ENGINE_TESTS = "tests/test_engines.py"


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if collection_path == ROOT / ENGINE_TESTS and not config.getoption("--engines"):
        return True
    return None
