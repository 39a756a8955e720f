"""A damaged run folder, made for real in tmp_path: a cut last metrics line is a crash's and is
dropped with one line, by `deploy report` and by a resumed run; anything worse is refused in
one line naming the file and the line, before anything starts."""

import subprocess
import sys

import pytest
from flwr.app import ArrayRecord

from app.checkpoint import ResumeState, RunRecorder
from app.config import AppConfig
from app.models import initial_adapter
from app.report import DamagedRunFolder, read_metrics
from app.strategy import RoundReport
from tests.conftest import ROOT

pytestmark = [pytest.mark.unit, pytest.mark.timeout(300)]

DROPPED = (
    "dropped a cut last line ({} bytes) after round 2; that round's durable state decides whether it is trained again"
)


def deploy(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deploy", "--app", str(ROOT), *args], capture_output=True, text=True, timeout=120
    )


@pytest.fixture()
def run(run_config, tmp_path):
    """A run folder after rounds 1 and 2 of 3, as the ServerApp leaves it."""
    config = AppConfig.from_run_config({**run_config, "num-server-rounds": 3})
    recorder = RunRecorder(tmp_path / "run", config)
    for r in (1, 2):
        recorder(RoundReport(r, ArrayRecord(initial_adapter(config.model, 0))))
    return config, tmp_path / "run"


CUTS = {
    "half a line, no newline": b'{"round": 3, "aggregation": "fed',
    "a whole JSON line without its newline": b'{"round": 3}',
    "a last line of NUL bytes": b"\0" * 20,
    "a last line that is not JSON, newline and all": b'{"round": 3, "aggreg\n',
}


@pytest.mark.parametrize("cut", CUTS.values(), ids=CUTS.keys())
def test_a_cut_last_line_is_dropped_and_said(run, cut, reliability):
    config, folder = run
    metrics = folder / "metrics.jsonl"
    with metrics.open("ab") as f:
        f.write(cut)
    said = f"{metrics}: {DROPPED.format(len(cut))}"
    assert read_metrics(folder).dropped == said and [r["round"] for r in read_metrics(folder).rounds] == [1, 2]

    report = deploy("report", str(folder))
    assert report.returncode == 0, report.stderr
    assert report.stdout.count(said) == 1 and report.stdout.startswith(said) and not report.stderr
    assert "2 rounds" in report.stdout

    # `deploy run --resume` reads this before starting; the ServerApp then rewrites the file
    # without the cut line, so that round 3's line starts a line of its own.
    resumed = ResumeState.read(folder, config)
    assert (resumed.round, resumed.metrics_dropped) == (2, said)
    recorder = RunRecorder(folder, config, resumed)
    assert read_metrics(folder).dropped is None
    recorder(RoundReport(3, ArrayRecord(resumed.adapter)))
    assert [r["round"] for r in read_metrics(folder).rounds] == [1, 2, 3] and metrics.read_bytes().endswith(b"}\n")
    name = next(k for k, v in CUTS.items() if v == cut)
    reliability.record(
        "fault",
        f"metrics.jsonl of a run folder ends in {name} (a crash while appending round 3)",
        f"deploy report exit 0 saying: {said}; a resume trains round 3 again and appends it whole",
    )


DAMAGE = {
    "a line in the middle that is not JSON": (1, b'{"round": 1, "aggre\n', "not a JSON line ("),
    "a JSON line in the middle that is no round's record": (2, b'{"note": "mine"}\n', "JSON but not a round's record"),
    "a last line that is JSON but no round's record": (3, b"[1, 2]\n", "a JSON list, not a round's record"),
}


@pytest.mark.parametrize("what", DAMAGE)
def test_worse_damage_is_refused_naming_file_and_line(run, demo, what, reliability):
    config, folder = run
    number, line, reason = DAMAGE[what]
    metrics = folder / "metrics.jsonl"
    lines = metrics.read_bytes().splitlines(keepends=True)
    lines[number - 1 : number] = [line]
    metrics.write_bytes(b"".join(lines))
    where = f"{metrics}:{number}: {reason}"
    with pytest.raises(DamagedRunFolder) as err:
        read_metrics(folder)
    assert str(err.value).startswith(where) and str(err.value).endswith(f"repair or delete line {number}")
    with pytest.raises(DamagedRunFolder):
        ResumeState.read(folder, config)

    report = deploy("report", str(folder))
    assert report.returncode == 2 and report.stderr == f"error: {err.value}\n" and not report.stdout
    args = ["run", "--resume", str(folder), "--gpus", "", "--run-config", f'model.name="{demo.model_dir}"']
    run_ = deploy(*args)
    assert run_.returncode == 2 and run_.stderr == f"error: {err.value}\n"
    assert "SuperNodes are up" not in run_.stdout and "Resuming" not in run_.stdout
    for command, done in (("deploy report RUN", report), ("deploy run --resume RUN --gpus ''", run_)):
        reliability.record(
            "bad input",
            f"{command} where metrics.jsonl has {what}",
            f"exit {done.returncode}, nothing started: {done.stderr.strip()}",
        )
