"""Figures a test measured, printed in pytest's terminal summary.

pytest captures a passing test's output, so figures printed by a test only
show with ``-s``; CI logs then never have them. A test takes the
:func:`report_figures` fixture and hands it a title and the figures' text;
:func:`pytest_terminal_summary` prints every one of them at the end of a
normal ``python -m pytest`` run, passed or failed, under a ``figures:`` header
per entry. ``tests/conftest.py`` imports both so every test module has them.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

#: (title, text) of every figures entry of this session, in the order reported.
FIGURES = pytest.StashKey[list[tuple[str, str]]]()


@pytest.fixture
def report_figures(request: pytest.FixtureRequest) -> Callable[[str, str], None]:
    """``report_figures(title, text)``: show ``text`` in the terminal summary under
    ``figures: <title> (<test id>)``."""

    def report(title: str, text: str) -> None:
        entries = request.config.stash.setdefault(FIGURES, [])
        entries.append((f"{title} ({request.node.nodeid})", text))

    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print every reported figures entry after the test results."""
    for title, text in terminalreporter.config.stash.get(FIGURES, []):
        terminalreporter.write_sep("=", f"figures: {title}")
        for line in text.splitlines():
            terminalreporter.write_line(line)
