"""Shared fixtures: the tiny embedded Gemma2 and Alpaca data, built once per session."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from flwr.common.config import flatten_dict

from deploy.demo import DemoAssets, build_demo

ROOT = Path(__file__).resolve().parents[1]


def assert_adapter_trained(demo: DemoAssets, run_dir: Path, final_round: int) -> None:
    """The last checkpoint loads with PEFT on the tiny base and moved away from round 0."""
    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(demo.model_dir)
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
