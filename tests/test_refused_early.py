"""Bad input to `render`, `kit` and `up` is refused as `deploy run` refuses it: before a file
is written or a container started, in one line naming the setting (issue 25)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import pytest
import yaml

from app.checkpoint import RunRecorder
from app.config import ConfigError
from deploy.project import resolve_run_config
from tests.conftest import ROOT

pytestmark = [pytest.mark.unit, pytest.mark.timeout(300)]


def deploy(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deploy", "--app", str(ROOT), *args], capture_output=True, text=True, env=env
    )


def one_line(done: subprocess.CompletedProcess, start: str) -> None:
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(start) and done.stderr.count("\n") == 1, done.stderr


BAD_CONFIG = [
    ("model.lora.peft-lora-r=0", "error: model.lora.peft-lora-r = 0: "),
    (
        "model.lora.peft-lora-rank=8",
        "error: model.lora.peft-lora-rank: not a setting of this app; did you mean model.lora.peft-lora-r?",
    ),
    ("static.strategy.fraction-train=0.5", "error: static.strategy.fraction-train = 0.5: a static leaderboard setting"),
]


@pytest.mark.parametrize(("config", "start"), BAD_CONFIG)
def test_render_refuses_a_bad_run_config_and_writes_nothing(tmp_path, config, start, reliability):
    out = tmp_path / "out"
    done = deploy("render", "--gpus", "0", "--run-config", config, "--out", str(out))
    one_line(done, start)
    assert not out.exists()
    reliability.record(
        "bad input", f"deploy render --run-config '{config}'", f"exit 2, no folder made: {done.stderr.strip()}"
    )


def test_render_refuses_4bit_on_a_layout_without_gpus(tmp_path, reliability):
    out = tmp_path / "out"
    done = deploy("render", "--gpus", "", "--run-config", "model.quantization=4", "--out", str(out))
    one_line(done, "error: model.quantization = 4: needs CUDA GPUs, and this layout has none")
    assert not out.exists()
    reliability.record("bad input", "deploy render --gpus '' with 4-bit quantization", f"exit 2: {done.stderr.strip()}")


@pytest.mark.parametrize(("config", "start"), BAD_CONFIG[:1])
def test_up_refuses_a_bad_run_config_before_it_reaches_the_engine(tmp_path, config, start, reliability):
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"}  # any contact would fail otherwise
    done = deploy("up", "--gpus", "0", "--run-config", config, "--dir", str(tmp_path), env=env)
    one_line(done, start)
    reliability.record(
        "bad input", f"deploy up --run-config '{config}'", f"exit 2, nothing started: {done.stderr.strip()}"
    )


def test_a_stack_run_config_names_the_containers_paths(tmp_path):
    """/model exists only inside the containers: the host does not look for it."""
    done = deploy("render", "--gpus", "0", "--run-config", "model.name='/model'", "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr


def test_results_dir_that_is_a_file_stops_deploy_run_before_anything_starts(demo, tmp_path, reliability):
    taken = tmp_path / "results"
    taken.write_text("")
    base = f'model.name="{demo.model_dir}" model.quantization=0 dataset.data-files="{demo.data_file}"'
    for results, start in (
        (taken, f"error: results.dir = '{taken}': is not a folder"),
        (taken / "runs", f"error: results.dir = '{taken}/runs': cannot be made: {taken} is not a folder"),
    ):
        done = deploy(
            "run", "--gpus", "", "--run-config", f'{base} results.dir="{results}"', "--workdir", str(tmp_path / "w")
        )
        one_line(done, start)
        assert not (tmp_path / "w").exists()
    reliability.record(
        "bad input",
        "deploy run with results.dir inside an existing file",
        f"exit 2, nothing started: {done.stderr.strip()}",
    )


def test_up_refuses_a_results_folder_it_cannot_make(tmp_path, reliability):
    (tmp_path / "results").write_text("")
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"}
    done = deploy("up", "--gpus", "0", "--dir", str(tmp_path), env=env)
    one_line(done, f"error: results.dir = '{tmp_path / 'results'}': is not a folder")
    reliability.record(
        "bad input", "deploy up with its results folder an existing file", f"exit 2: {done.stderr.strip()}"
    )


@pytest.fixture
def read_only_folder(tmp_path):
    """A read-only file system (root writes anywhere else): a tmpfs mounted ro."""
    folder = tmp_path / "ro"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_read_only_results_folder_stops_deploy_run(demo, tmp_path, read_only_folder, reliability):
    config = (
        f'model.name="{demo.model_dir}" model.quantization=0 dataset.data-files="{demo.data_file}" '
        f'results.dir="{read_only_folder}/runs"'
    )
    done = deploy("run", "--gpus", "", "--run-config", config, "--workdir", str(tmp_path / "w"))
    one_line(
        done, f"error: results.dir = '{read_only_folder}/runs': not writable by uid {os.getuid()} ({read_only_folder}"
    )
    assert not (tmp_path / "w").exists()
    reliability.record(
        "bad input", "deploy run with results.dir on a read-only file system", f"exit 2: {done.stderr.strip()}"
    )


def test_the_serverapp_names_results_dir_when_it_cannot_write_there(demo, tmp_path):
    taken = tmp_path / "results"
    taken.write_text("")
    _, config = resolve_run_config(ROOT, {"model.name": str(demo.model_dir), "results.dir": str(taken)})
    with pytest.raises(ConfigError) as refused:
        RunRecorder(taken / "20261206-run1", replace(config))
    assert str(refused.value) == f"results.dir = '{taken}': cannot write the run folder there (Not a directory)"


def test_host_names_are_one_host_whatever_their_case(reliability):
    done = deploy("plan", "--host", "gpu-a=0", "--host", "GPU-A=1")
    one_line(done, "error: hosts ['gpu-a', 'GPU-A']: names must be distinct (host names are case-insensitive)")
    reliability.record("bad input", "deploy plan --host gpu-a=0 --host GPU-A=1", f"exit 2: {done.stderr.strip()}")


@pytest.mark.parametrize("address", ["2001:db8::5", "[2001:db8::5]"])
def test_an_ipv6_superlink_address_is_dialled_in_brackets(tmp_path, address):
    out = tmp_path / "out"
    done = deploy("render", "--host", "a=0", "--host", "b=0", "--superlink-address", address, "--out", str(out))
    assert done.returncode == 0, done.stderr
    document = yaml.safe_load((out / "compose.b.yaml").read_text())
    command = document["services"]["supernode-1"]["command"]
    assert command[command.index("--superlink") + 1] == "[2001:db8::5]:8000"


def test_a_bad_superlink_address_is_refused_in_one_line(tmp_path):
    done = deploy("render", "--host", "a=0", "--superlink-address", "10.0.0.5:8000", "--out", str(tmp_path / "o"))
    one_line(done, "error: --superlink-address '10.0.0.5:8000': expected a host name, an IPv4 address or an IPv6")


def test_a_bad_gpu_list_in_host_names_the_host_option():
    done = deploy("plan", "--host", "gpu-a=x")
    one_line(done, "error: --host 'gpu-a=x'")
    assert "--gpus" not in done.stderr


@pytest.mark.parametrize("partition", ["20", "-1"])
def test_a_hand_started_supernode_with_a_bad_partition_is_refused_before_it_joins(partition, reliability):
    node_config = f"partition-id={partition} num-partitions=20"
    done = deploy("supernode", "--", "--superlink", "127.0.0.1:1", "--insecure", "--node-config", node_config)
    one_line(done, f"error: partition-id = {partition}: must be an integer in [0, 19]")
    reliability.record(
        "bad input", f"deploy supernode -- ... --node-config '{node_config}'", f"exit 2: {done.stderr.strip()}"
    )


def test_a_hand_started_supernode_with_a_good_node_config_becomes_flower_supernode():
    node = subprocess.Popen(
        [sys.executable, "-m", "deploy", "--app", str(ROOT), "supernode", "--", "--superlink", "127.0.0.1:1",
         "--insecure", "--node-config", "partition-id=3 num-partitions=20"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert "Starting Flower SuperNode" in node.stdout.readline()  # Flower's first line: it replaced us
    finally:
        node.kill()
        node.wait(30)
