"""The deploy tool's front door: layouts printed, bad input stopped with one line and exit 2."""

import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest

from deploy.demo import alpaca_rows
from tests.conftest import ROOT

pytestmark = pytest.mark.unit


def deploy(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deploy", "--app", str(ROOT), *args], capture_output=True, text=True, env=env
    )


@pytest.mark.parametrize("command", [["up", "--no-submit"], ["status"], ["logs", "superlink"], ["down"]])
def test_no_docker_engine_is_one_line_and_exit_2(tmp_path, command, reliability):
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"}
    cpu = ["--gpus", "", "--run-config", "model.quantization=0"]  # a layout `up` accepts: only the engine is missing
    done = deploy(*command, *cpu, "--insecure", "--dir", str(tmp_path), env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: no Docker engine answers (")
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    tried = f"deploy {' '.join(command)} with no Docker engine answering"
    reliability.record("fault", tried, f"exit {done.returncode}: {done.stderr.strip()}")


def test_plan_prints_node_partition_host_gpu_trainer():
    done = deploy("plan", "--gpus", "0,1,2")
    lines = done.stdout.splitlines()
    assert done.returncode == 0 and lines[0].split() == ["node", "partition", "host", "gpu", "trainer"]
    assert len(lines) == 21 and lines[5].split() == ["supernode-4", "4", "localhost", "1", "trainer-gpu1", "(x1)"]
    one_gpu = deploy("plan", "--gpus", "0").stdout.splitlines()
    assert one_gpu[1].split() == ["supernode-0", "0", "localhost", "0", "trainer-gpu0", "(x2)"]
    in_process = deploy("plan", "--gpus", "0", "--trainers-per-gpu", "0").stdout.splitlines()
    assert in_process[1].split() == ["supernode-0", "0", "localhost", "0", "in", "process"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--run-config", "model.lora.peft-lora-r=-1"], "error: model.lora.peft-lora-r = -1: must be an integer > 0"),
        (
            ["--run-config", "model.lora.r=8"],
            "error: model.lora.r: not a setting of this app; renamed to model.lora.peft-lora-r",
        ),
        (["--run-config", "model.quantization=3"], "error: model.quantization = 3: must be one of 0, 4, 8"),
        (["--run-config", "no.such-key=1"], "error: no.such-key: not a setting of this app; see"),
        (["--gpus", "0,zero"], "error: --gpus '0,zero': expected GPU ids such as 0,1,2,3"),
        (["--gpus", ","], "error: --gpus ',': expected GPU ids such as 0,1,2,3 (or '' for the CPU)"),
        (["--resume", "/no/such/run"], "error: results.resume-from = '/no/such/run': no resume.json there"),
        (["--run-config", "model.lora.peft-lora-alpha=sixteen"], "error: --run-config 'model.name="),
        (
            ["--run-config", "static.strategy.fraction-train=0.15"],
            "error: static.strategy.fraction-train = 0.15: a static leaderboard setting, fixed at 0.1 "
            "(leaderboard=false allows it",
        ),
        (
            ["--run-config", "model.quantization=4"],
            "error: model.quantization = 4: needs CUDA GPUs, and this layout has none; use model.quantization=0",
        ),
    ],
)
def test_bad_input_stops_before_anything_starts(demo, args, message, reliability):
    tried = shlex.join(["deploy", "run", *args])
    if "--run-config" in args:
        args = [args[0], f'model.name="{demo.model_dir}" {args[1]}', "--gpus", ""]
    done = deploy("run", *args)
    assert done.returncode == 2
    assert done.stderr.startswith(message) and done.stderr.count("\n") == 1
    assert "SuperNodes are up" not in done.stdout
    reliability.record("bad input", tried, f"exit {done.returncode}, nothing started: {done.stderr.strip()}")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            'model.name="no-org/no-such-model"',
            "error: model.name = 'no-org/no-such-model': not a local folder (write ./path or /path) "
            "and not fetched from the hub: ",
        ),
        (
            'dataset.data-files="/no/such.json"',
            "error: dataset.data-files = '/no/such.json': no such file on this host",
        ),
        (
            'dataset.data-files="{bad}/not-json.json"',
            "error: dataset.data-files = '{bad}/not-json.json': cannot be read as JSON rows (",
        ),
        (
            'dataset.data-files="{bad}/no-output.json"',
            "error: dataset.data-files = '{bad}/no-output.json': rows have no 'output'; "
            "each row needs 'instruction' and 'output'",
        ),
        (
            'dataset.data-files="{bad}/three-rows.json"',
            "error: dataset.data-files = '{bad}/three-rows.json': 3 rows for static.dataset.num-partitions = 20: "
            "some partitions would be empty",
        ),
        (
            'dataset.data-files="{bad}/empty-outputs.json"',
            "error: dataset.data-files = '{bad}/empty-outputs.json': every row's 'output' is empty or whitespace "
            "(25 rows), so no row has a response to learn; each row needs one",
        ),
    ],
)
def test_a_model_or_data_that_cannot_be_had_stops_before_anything_starts(
    demo, tmp_path, overrides, message, reliability
):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "not-json.json").write_text("instruction: Add. output: 5")
    (bad / "no-output.json").write_text('[{"instruction": "Add.", "input": "2 and 3"}]')
    row = '{"instruction": "Add.", "input": "2 and 3", "output": "5"}'
    (bad / "three-rows.json").write_text(f"[{row}, {row}, {row}]")
    blank = [{**r, "output": " " * (i % 3)} for i, r in enumerate(alpaca_rows(25, seed=1))]
    (bad / "empty-outputs.json").write_text(json.dumps(blank))
    overrides, message = overrides.format(bad=bad), message.format(bad=bad)
    tried = f"deploy run with {overrides}, offline"
    if "model.name" not in overrides:
        overrides += f' model.name="{demo.model_dir}"'
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = deploy(
        "run", "--gpus", "", "--workdir", str(tmp_path), "--run-config", f"model.quantization=0 {overrides}", env=env
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(message) and done.stderr.count("\n") == 1, done.stderr
    assert "SuperNodes are up" not in done.stdout and not (tmp_path / "logs" / "superlink.log").exists()
    reliability.record("bad input", tried, f"exit {done.returncode}, nothing started: {done.stderr.strip()}")


def test_fetch_model_fills_the_caches_once_before_nodes_start(demo, tmp_path):
    """What compose's model-fetch service and the process backend run: the dataset lands in
    the host's datasets cache; a local model needs nothing."""
    cache = tmp_path / "datasets-cache"
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    overrides = f'model.name="{demo.model_dir}" dataset.data-files="{demo.data_file}"'
    done = deploy("fetch-model", "--run-config", overrides, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"{demo.model_dir}: local model, nothing to fetch",
        f"{demo.data_file}: cached (20 rows in partition 0 of 20)",
    ]
    assert any(cache.rglob("*.arrow"))


def test_a_model_the_containers_cannot_read_is_refused_before_anything_starts(demo, tmp_path):
    """Weights saved as root by transformers are 0600; uid 1000 in the containers cannot load
    them, which the trainers would report as a FileNotFoundError (seen on the H100)."""
    from app.config import ConfigError
    from deploy.fetch import check_readable

    model = tmp_path / "model"
    shutil.copytree(demo.model_dir, model)
    for path in (model, *model.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    os.chown(model / "model.safetensors", 0, 0)
    check_readable(model, 1000, [1000])  # world-readable: fine
    check_readable(model, 0, [0])
    (model / "model.safetensors").chmod(0o600)
    with pytest.raises(ConfigError) as refused:
        check_readable(model, 1000, [1000])
    assert str(refused.value) == (
        f"model.name = '{model}': model.safetensors is not readable by uid 1000 (1 of its files or folders); "
        "on the host: chmod -R a+rX <the model folder>"
    )
    check_readable(model, 0, [0])  # its owner reads it
    os.chown(model / "model.safetensors", 0, 1000)
    (model / "model.safetensors").chmod(0o640)
    check_readable(model, 1000, [1000])  # through its group
    model.chmod(0o700)
    with pytest.raises(ConfigError, match=r"model.name = .*: \. is not readable by uid 1000"):
        check_readable(model, 1000, [1000])
