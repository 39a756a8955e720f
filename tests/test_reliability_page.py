"""`python -m tests.reliability write|check` on fabricated records: CI trusts the page only as far as
these show that a changed outcome fails the check and a changed timing or date does not."""

from __future__ import annotations

import json

import pytest

from tests.reliability import main

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


def fabricated(**changes) -> dict:
    record = {
        "full": True,
        "partial_because": [],
        "command": ".venv/bin/python -m pytest -q",
        "date": "2026-12-01",
        "seconds": 1645.2,
        "recording_tests": 2,
        "records": [
            {"kind": "bad input", "what": "--gpus ','", "outcome": "refused: --gpus ','", "rounds_lost": 0},
            {"kind": "fault", "what": "a trainer SIGKILLed", "outcome": "restarted in 4.2 s | `ok`", "rounds_lost": 0},
        ],
    }
    return {**record, **changes}


def run(tmp_path, action: str, record: dict) -> int:
    (tmp_path / "last-run.json").write_text(json.dumps(record))
    page = tmp_path / "docs" / "reliability.md"
    return main([action, "--record", str(tmp_path / "last-run.json"), "--page", str(page)])


def test_write_makes_the_page_and_check_accepts_it(tmp_path, capsys):
    assert run(tmp_path, "write", fabricated()) == 0
    text = (tmp_path / "docs" / "reliability.md").read_text()
    assert "| fault | a trainer SIGKILLed | restarted in 4.2 s \\| \\`ok\\` | 0 |" in text
    assert text.index("| fault |") < text.index("| bad input |")  # by kind, faults first
    assert "- faults survived (as their tests demand, no round lost): 1 of 1" in text
    assert "on 2026-12-01: 2 tests that record, all passed; the run took 27 min 25 s." in text
    assert run(tmp_path, "check", fabricated()) == 0
    assert "lists the 2 checks and outcomes of the run just made" in capsys.readouterr().out


def test_check_allows_other_timings_and_dates(tmp_path):
    assert run(tmp_path, "write", fabricated()) == 0
    later = fabricated(date="2027-01-02", seconds=90.0)
    later["records"][1] = {**later["records"][1], "outcome": "restarted in 11 s | `ok`"}
    assert run(tmp_path, "check", later) == 0


@pytest.mark.parametrize("change", ["outcome", "row gone", "row added", "rounds lost"])
def test_check_fails_on_another_check_or_outcome(tmp_path, capsys, change):
    assert run(tmp_path, "write", fabricated()) == 0
    other = fabricated()
    bad = {"kind": "bad input", "what": "--gpus ','", "outcome": "accepted", "rounds_lost": 0}
    if change == "outcome":
        other["records"][0] = bad
    elif change == "row gone":
        del other["records"][0]
    elif change == "row added":
        other["records"].append(bad)
    else:
        other["records"][1] = {**other["records"][1], "rounds_lost": 1}
    assert run(tmp_path, "check", other) == 1
    said = capsys.readouterr().err
    assert "does not list the checks and outcomes of the run just made" in said
    assert "python -m tests.reliability write" in said
    assert ("only in the run:" in said) == (change != "row gone")


def test_a_partial_run_is_neither_written_nor_compared(tmp_path, capsys):
    partial = fabricated(full=False, partial_because=["ran only tests/test_cli.py"], records=[])
    assert run(tmp_path, "write", partial) == 1
    assert not (tmp_path / "docs" / "reliability.md").exists()
    assert "partial (ran only tests/test_cli.py)" in capsys.readouterr().err
    assert run(tmp_path, "check", partial) == 0
    assert "not compared: the last run was partial (ran only tests/test_cli.py)" in capsys.readouterr().out


def test_check_without_a_record_says_to_run_the_tests(tmp_path):
    with pytest.raises(SystemExit, match="no record at .*: run the tests first"):
        main(["check", "--record", str(tmp_path / "none.json"), "--page", str(tmp_path / "page.md")])
