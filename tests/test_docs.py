"""Every `deploy` command and option the documentation shows exists, so that a renamed or removed
option cannot linger in README.md or docs/ as an instruction that fails."""

from __future__ import annotations

import argparse
import re

import pytest

from deploy.cli import parser
from tests.conftest import ROOT

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DEPLOY = re.compile(r"(?<![\w.-])deploy\b(?![./\w-])")  # not deploy/cli.py, deploy.reaped, local-deployment
COMMAND = re.compile(r"[a-z][a-z-]*(?:/[a-z][a-z-]*)*")


def code(text: str) -> list[str]:
    """The code a page shows: fenced blocks and inline spans (a ``double`` span may hold `single` ones)."""
    snippets = []
    for i, part in enumerate(re.split(r"(?m)^```.*$", text)):  # odd parts: inside a fence
        snippets += [part] if i % 2 else [body for _, body in re.findall(r"(`+)(.+?)\1", part, re.S)]
    return snippets


def tried(text: str) -> list[str]:
    """docs/reliability.md's cells are plain text with Markdown's special characters escaped (`\\``), not
    code spans: the cells that are a `deploy` command line, and the spans inside the others, unescaped."""
    cells = [
        re.sub(r"\\(.)", r"\1", cell)
        for line in text.splitlines()
        if line.startswith("| ")
        for cell in re.split(r"(?<!\\) \| ", line.strip("| "))
    ]
    return [cell for cell in cells if cell.startswith("deploy ")] + code("\n".join(cells))


def shown(snippets: list[str]) -> list[tuple[str | None, list[str]]]:
    """(command or None, its --options) for every `deploy ...` in the snippets; `deploy a/b` names both."""
    found = []
    for line in (line for snippet in snippets for line in snippet.splitlines()):
        for match in DEPLOY.finditer(line):
            rest = re.split(r"\s#|&&|;|\||`|\bdeploy\b", line[match.end() :])[0].split()
            rest = rest[: rest.index("--")] if "--" in rest else rest  # after it: another program's options
            options = [m[0] for m in (re.match(r"--[a-z][a-z0-9-]*", t) for t in rest) if m]
            if rest and COMMAND.fullmatch(first := rest[0].rstrip(":,.)")):
                found += [(command, options) for command in first.split("/")]
            else:
                found.append((None, options))
    return found


def missing(root: argparse.ArgumentParser, uses: list[tuple[str | None, list[str]]]) -> list[str]:
    """The uses that `root` does not know: an unknown command, or an option its command lacks."""
    commands = next(a for a in root._actions if isinstance(a, argparse._SubParsersAction)).choices
    wrong = []
    for command, options in uses:
        if command is not None and command not in commands:
            wrong.append(f"deploy {command}: no such command")
            continue
        known = {s for a in (commands[command] if command else root)._actions for s in a.option_strings}
        wrong += [
            f"deploy {command or ''} {option}: no such option".replace("  ", " ")
            for option in options
            if option not in known
        ]
    return wrong


def test_every_deploy_command_and_option_in_the_docs_exists():
    uses = []
    for page in PAGES:
        text = page.read_text()
        uses += shown(code(text) + (tried(text) if page.name == "reliability.md" else []))
    assert len({c for c, _ in uses}) >= 10 and sum(len(o) for _, o in uses) >= 30  # the pages were read
    assert missing(parser(), uses) == []


def test_a_made_up_command_or_option_is_caught():
    text = (
        "Run `deploy run --gpus 0 --no-such-option` or, with `deploy tool`, the deploy tool:\n"
        "```bash\n.venv/bin/deploy plan/up --trainers-per-gpu 2 --made-up=1  # --in-a-comment\n```\n"
        "``error: … continue with `deploy run --resume FOLDER` ``; not deploy/cli.py nor `python -m deploy.reaped`"
    )
    assert missing(parser(), shown(code(text))) == [
        "deploy run --no-such-option: no such option",
        "deploy tool: no such command",
        "deploy plan --made-up: no such option",
        "deploy up --made-up: no such option",
    ]
