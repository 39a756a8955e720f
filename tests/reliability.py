"""README's Reliability table, written by the tests themselves (a pytest plugin).

A test that tries a fault, a bad input or an intrusion takes the `reliability` fixture and
calls `reliability.record(kind, what, outcome, rounds_lost)` with what it saw; a record counts
only if its test passes. At the end of a run that collected the whole suite and passed every
test that records, the table replaces README's section between the markers; after any other
run it goes to `reliability.md` in pytest's temporary folder, named in the terminal summary,
and README stays as it was. Paths under that folder read `$TMP` and the checkout's path `.`,
so the table changes between runs only where an outcome does.
"""

from __future__ import annotations

import datetime
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

KINDS = ("fault", "bad input", "intrusion")
BEGIN, END = "<!-- reliability:begin -->", "<!-- reliability:end -->"
README = "README.md"


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
    summary: str | None = None  # what the terminal summary says


LOG = pytest.StashKey[Log]()
RECORDER = pytest.StashKey[Recorder]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[LOG] = Log()


@pytest.fixture(scope="session")
def reliability_log(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Log:
    """The session's collector; its temporary folder is where a partial run's table goes."""
    log = pytestconfig.stash[LOG]
    log.basetemp = tmp_path_factory.getbasetemp()
    return log


@pytest.fixture()
def reliability(request: pytest.FixtureRequest, reliability_log: Log):
    """`reliability.record(kind, what, outcome, rounds_lost=0)`: one row of README's table."""
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
    reasons += [f"--{name.replace('_', '-')} given" for name in ("ignore", "ignore_glob", "lf") if config.getoption(name, None)]
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


def _replace_section(readme: Path, lines: list[str]) -> bool:
    """README's text between the markers becomes `lines`; False when a marker (or README) is missing."""
    text = readme.read_text() if readme.is_file() else ""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        return False
    new = text[: start + len(BEGIN)] + "\n" + "\n".join(lines) + "\n" + text[end:]
    if new != text:
        readme.write_text(new)
    return True


def pytest_sessionfinish(session: pytest.Session) -> None:
    log = session.config.stash[LOG]
    if log.basetemp is None:  # no recording test ran: nothing to report
        return
    records = [r for records in log.kept.values() for r in records]
    command = shlex.join([".venv/bin/python", "-m", "pytest", *session.config.invocation_params.args])
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    reasons = _narrowing(session)
    readme = session.config.rootpath / README
    if not reasons:
        footer = f"Generated by `{command}` on {today}, from the {len(log.kept)} tests that record (all passed)."
        if _replace_section(readme, [*table(records), "", footer]):
            log.summary = f"{README}'s Reliability table rewritten: {len(records)} rows from {len(log.kept)} tests"
            return
        reasons = [f"{README} lacks the markers {BEGIN} … {END}"]
    partial = log.basetemp / "reliability.md"
    header = f"Partial run (`{command}` on {today}; README.md left as it was): {'; '.join(reasons)}."
    partial.write_text("\n".join([header, "", *table(records)]) + "\n")
    log.summary = f"reliability table of this partial run ({'; '.join(reasons)}): {partial}"


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    if config.stash[LOG].summary:
        terminalreporter.write_line(config.stash[LOG].summary)
