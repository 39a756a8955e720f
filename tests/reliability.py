"""docs/reliability.md's table, from what the tests themselves saw (a pytest plugin and a command).

A test that tries a fault, a bad input or an intrusion takes the `reliability` fixture and
calls `reliability.record(kind, what, outcome, rounds_lost)` with what it saw; a record counts
only if its test passes. Every run leaves its records in `.reliability/last-run.json`
(git-ignored), marked full or partial: tests never write tracked files. A run is full when it
collected the whole suite (no path narrower than `testpaths`, nothing deselected by `-k`, `-m`
or `--deselect`, no `--ignore`/`--lf`, every module collected) and every recording test passed;
anything else is partial and says why. Paths under pytest's temporary folder read `$TMP` and
the checkout's path `.`, so a page changes between runs only where an outcome does.

    python -m tests.reliability write   # docs/reliability.md from the last full run's record
    python -m tests.reliability check   # exit 1 unless docs/reliability.md has that run's rows

`check` is CI's (.ci/run, after the tests): the committed page must list the same checks with
the same outcomes as the run just made; its date and timings may differ. A partial run's
record is not compared (exit 0, saying why), so a narrower run never fails it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shlex
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest

KINDS = ("fault", "bad input", "intrusion")
ROOT = Path(__file__).resolve().parents[1]
RECORD = Path(".reliability") / "last-run.json"  # under the rootdir; .gitignore lists the folder
PAGE = Path("docs") / "reliability.md"
WRITE_COMMAND = "python -m tests.reliability write"


@dataclass(frozen=True)
class Record:
    kind: str
    what: str
    outcome: str
    rounds_lost: int


@dataclass
class Recorder:
    """What one test tried and saw; the plugin keeps it if the test passes."""

    replacements: dict[str, str]
    records: list[Record] = field(default_factory=list)

    def record(self, kind: str, what: str, outcome: str, rounds_lost: int = 0) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r}: must be one of {', '.join(KINDS)}")
        if rounds_lost < 0:
            raise ValueError(f"rounds_lost = {rounds_lost}: must be >= 0")
        self.records.append(Record(kind, self._plain(what), self._plain(outcome), rounds_lost))

    def _plain(self, text: str) -> str:
        """Machine-specific paths replaced, so that two runs give the same text."""
        for path, name in self.replacements.items():
            text = text.replace(path, name)
        return text


@dataclass
class Log:
    """The session's records by test, and whatever made the run narrower than the suite."""

    kept: dict[str, list[Record]] = field(default_factory=dict)
    narrowed: list[str] = field(default_factory=list)
    basetemp: Path | None = None  # set once a recording test starts
    started: float = field(default_factory=time.monotonic)
    summary: str | None = None  # what the terminal summary says


LOG = pytest.StashKey[Log]()
RECORDER = pytest.StashKey[Recorder]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[LOG] = Log()


@pytest.fixture(scope="session")
def reliability_log(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Log:
    """The session's collector; its temporary folder's path is replaced by `$TMP` in records."""
    log = pytestconfig.stash[LOG]
    log.basetemp = tmp_path_factory.getbasetemp()
    return log


@pytest.fixture()
def reliability(request: pytest.FixtureRequest, reliability_log: Log):
    """`reliability.record(kind, what, outcome, rounds_lost=0)`: one row of docs/reliability.md."""
    recorder = Recorder({str(reliability_log.basetemp): "$TMP", str(request.config.rootpath): "."})
    request.node.stash[RECORDER] = recorder
    yield recorder
    if reliability_log.kept.get(request.node.nodeid) == []:
        pytest.fail("this test takes the reliability fixture but recorded nothing", pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Keeps a test's records once its call passed; drops them if its teardown then fails."""
    report = yield
    recorder = item.stash.get(RECORDER, None)
    if recorder is not None and report.when == "call" and report.passed:
        item.config.stash[LOG].kept[item.nodeid] = list(recorder.records)
    elif recorder is not None and report.failed:
        item.config.stash[LOG].kept.pop(item.nodeid, None)
    return report


def pytest_deselected(items: list[pytest.Item]) -> None:
    if items:
        items[0].config.stash[LOG].narrowed.append(f"{len(items)} tests deselected")


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    """A module that did not collect may hold recording tests nobody ran."""
    report = yield
    if not report.passed:
        collector.config.stash[LOG].narrowed.append(f"{report.nodeid or 'collection'} {report.outcome}")
    return report


def _narrowing(session: pytest.Session) -> list[str]:
    """Why this run is not the whole suite with every recording test passed (empty: it is)."""
    config, log = session.config, session.config.stash[LOG]
    whole = {config.rootpath, *(config.rootpath / p for p in config.getini("testpaths"))}
    narrower = [arg for arg in config.args if (config.invocation_params.dir / arg).resolve() not in whole]
    reasons = [f"ran only {', '.join(narrower)}"] if narrower else []
    reasons += [
        f"--{name.replace('_', '-')} given" for name in ("ignore", "ignore_glob", "lf") if config.getoption(name, None)
    ]
    recording = [item.nodeid for item in session.items if "reliability" in item.fixturenames]
    failed = [nodeid for nodeid in recording if nodeid not in log.kept]
    if failed:
        reasons.append(f"{len(failed)} of {len(recording)} recording tests did not pass (first: {failed[0]})")
    return reasons + log.narrowed


def _cell(text: str) -> str:
    """Plain text in a table cell: Markdown's special characters escaped (an underscore inside
    a word is plain text already), line breaks shown."""
    special = r"[\\`*<|]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])"
    return re.sub(special, lambda m: "\\" + m[0], text).replace("\n", "<br>")


def table(records: list[Record]) -> list[str]:
    """The rows by kind, in test order within a kind, and the totals."""
    rows = sorted(records, key=lambda r: KINDS.index(r.kind))
    by_kind = {kind: [r for r in rows if r.kind == kind] for kind in KINDS}
    survived = sum(r.rounds_lost == 0 for r in by_kind["fault"])
    one_line = sum("\n" not in r.outcome for r in by_kind["bad input"])
    return [
        "| kind | what was tried | observed outcome | rounds lost |",
        "| --- | --- | --- | --- |",
        *(f"| {r.kind} | {_cell(r.what)} | {_cell(r.outcome)} | {r.rounds_lost} |" for r in rows),
        "",
        f"- faults survived (as their tests demand, no round lost): {survived} of {len(by_kind['fault'])}",
        f"- bad inputs tried: {len(by_kind['bad input'])}, all refused; with a one-line message: {one_line}",
        f"- intrusions tried, all refused: {len(by_kind['intrusion'])}",
        f"- rounds lost: {sum(r.rounds_lost for r in rows)} (must be 0)",
    ]


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def page(record: dict) -> str:
    """docs/reliability.md for a full run's record."""
    records = [Record(**r) for r in record["records"]]
    return "\n".join(
        [
            "# Reliability",
            "",
            "Every fault, bad input and intrusion the tests try, with the outcome each test observed. The",
            "tests record what they tried and saw through the `reliability` fixture (`tests/reliability.py`),",
            "a record counts only if its test passed, and every run leaves its records in",
            f"`{RECORD}` (not tracked). `{WRITE_COMMAND}` writes this page from the record of a",
            "full run (the whole suite, every recording test passed); CI's `python -m tests.reliability check`",
            "fails when this page and the run it just made differ in a check or an outcome",
            "([development](development.md#the-reliability-page)).",
            "",
            "<!-- written by `python -m tests.reliability write`: edit the tests, not this page -->",
            *table(records),
            "",
            f"Written by `{WRITE_COMMAND}` from the record of `{record['command']}` on {record['date']}: "
            f"{record['recording_tests']} tests that record, all passed; the run took {_duration(record['seconds'])}.",
            "",
        ]
    )


_TIMING = re.compile(r"\b\d+(?:\.\d+)? ?(?:ms|s|min|seconds)\b")


def _rows(lines: list[str] | str) -> Counter[str]:
    """A table's rows, timings blanked: what a page and a run must agree on."""
    lines = lines.splitlines() if isinstance(lines, str) else lines
    return Counter(_TIMING.sub("…", line) for line in lines if line.startswith(tuple(f"| {k} |" for k in KINDS)))


def check(record: dict, committed: str) -> list[str]:
    """How the committed page differs from a full run's record in its checks and outcomes (empty: it does not)."""
    ran, shown = _rows(table([Record(**r) for r in record["records"]])), _rows(committed)
    differences = [f"only in the run: {row}" for row in ran - shown]
    return differences + [f"only in {PAGE}: {row}" for row in shown - ran]


def _load(path: Path) -> dict:
    if not path.is_file():
        raise SystemExit(f"no record at {path}: run the tests first (.venv/bin/python -m pytest -q)")
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.reliability", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("write", "check"))
    parser.add_argument("--record", type=Path, default=ROOT / RECORD, help=f"(default: {RECORD})")
    parser.add_argument("--page", type=Path, default=ROOT / PAGE, help=f"(default: {PAGE})")
    args = parser.parse_args(argv)
    record = _load(args.record)
    if not record["full"]:
        why = f"the last run was partial ({'; '.join(record['partial_because'])})"
        if args.action == "write":
            print(f"{args.page} not written: {why}; run the whole suite first", file=sys.stderr)
            return 1
        print(f"{args.page} not compared: {why}")
        return 0
    if args.action == "write":
        args.page.parent.mkdir(parents=True, exist_ok=True)
        args.page.write_text(page(record))
        print(f"{args.page}: {len(record['records'])} rows from {record['recording_tests']} tests")
        return 0
    differences = check(record, args.page.read_text() if args.page.is_file() else "")
    if differences:
        print(
            f"{args.page} does not list the checks and outcomes of the run just made ({len(differences)} rows differ); "
            f"run `{WRITE_COMMAND}` and commit the page if the change is meant:",
            *(f"  {d}" for d in differences),
            sep="\n",
            file=sys.stderr,
        )
        return 1
    print(f"{args.page} lists the {len(record['records'])} checks and outcomes of the run just made")
    return 0


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Leaves this run's records in the ignored record file, full or partial."""
    log = session.config.stash[LOG]
    reasons = _narrowing(session)
    record = {
        "full": not reasons,
        "partial_because": reasons,
        "command": shlex.join([".venv/bin/python", "-m", "pytest", *session.config.invocation_params.args]),
        "date": datetime.datetime.now(datetime.UTC).date().isoformat(),
        "seconds": round(time.monotonic() - log.started, 1),
        "recording_tests": len(log.kept),
        "records": [asdict(r) for records in log.kept.values() for r in records],
    }
    path = session.config.rootpath / RECORD
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    if reasons:
        log.summary = f"reliability record (partial run: {'; '.join(reasons)}): {RECORD}"
    else:
        log.summary = f"reliability record (full run): {RECORD}; `{WRITE_COMMAND}` makes {PAGE} from it"


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    if config.stash[LOG].summary:
        terminalreporter.write_line(config.stash[LOG].summary)


if __name__ == "__main__":
    sys.exit(main())
