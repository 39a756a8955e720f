"""Every test belongs to exactly one tier (a pytest plugin), so that `-m unit` is the quick check
of a change to the math and the tiers together are the whole suite that README's command runs.

The tiers are registered in pyproject.toml's [tool.pytest.ini_options] markers; a module names its
tier with `pytestmark`, a module of mixed tiers on each test. Collection stops with the tests that
have no tier or more than one, before anything runs.
"""

from __future__ import annotations

import pytest

TIERS = ("unit", "deployment", "docker", "soak")


def tiers_of(item: pytest.Item) -> set[str]:
    return {mark.name for mark in item.iter_markers() if mark.name in TIERS}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: every collected test is checked
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    tiers = {item.nodeid: tiers_of(item) for item in items}
    wrong = [f"{nodeid}: {', '.join(sorted(marks)) or 'none'}" for nodeid, marks in tiers.items() if len(marks) != 1]
    if wrong:
        raise pytest.UsageError(
            f"{len(wrong)} tests need exactly one tier mark of {', '.join(TIERS)} (pytestmark or a decorator):\n  "
            + "\n  ".join(wrong)
        )
