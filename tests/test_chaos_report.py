"""The chaos suites' bookkeeping, without the stack: figures reach pytest's terminal
summary of a passing run, and commits the client never saw ACCEPTED are classified."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.chaos_client import (
    GAVE_UP,
    NEVER_SENT,
    REFUSED,
    Accepted,
    ClientRecord,
    unaccepted_commits,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_figures_show_in_the_summary_of_a_passing_run_without_s(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(
        "from tests.figures import pytest_terminal_summary, report_figures  # noqa: F401\n"
    )
    (tmp_path / "test_measured.py").write_text(
        "def test_measures(report_figures):\n"
        "    print('captured progress line')\n"
        "    report_figures('demo', 'lost 0\\nduplicates 3 (bound 12)')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    header = next(
        i for i, line in enumerate(lines) if "figures: demo (test_measured.py::test_measures)" in line
    )
    assert lines[header + 1 : header + 3] == ["lost 0", "duplicates 3 (bound 12)"]
    assert "captured progress line" not in result.stdout  # captured as usual: only the figures show


def test_commits_without_accepted_are_told_apart_by_the_clients_last_answer() -> None:
    record = ClientRecord(
        accepted={"ok": Accepted("tenant-0", "n1", {"email": "d1"}, tries=2)},
        not_accepted={
            "lost-answer": "gave up after 100 tries",
            "invalid": "INVALID_ARGUMENT",
            "invalid-item": "item INVALID_ARGUMENT",
            "never-committed": "gave up after 3 tries",
        },
    )
    kinds = unaccepted_commits(["ok", "lost-answer", "invalid", "invalid-item", "stranger"], record)
    assert kinds == {
        "lost-answer": GAVE_UP,  # legitimate: the client does not know the outcome
        "invalid": REFUSED,
        "invalid-item": REFUSED,
        "stranger": NEVER_SENT,
    }
