"""Project promises: static checks stay clean, README lists every setting, CI runs README's command."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from switchboard.protogen import REPO_ROOT
from switchboard.settings import Settings

README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_lists_every_setting() -> None:
    missing = [
        f"SWITCHBOARD_{name.upper()}"
        for name in Settings.model_fields
        if f"`SWITCHBOARD_{name.upper()}`" not in README
    ]
    assert not missing


def test_ci_runs_exactly_the_readme_test_command() -> None:
    blocks = re.findall(r"```sh\n(.*?)\n```", README, flags=re.S)
    test_command = next(b for b in blocks if "pytest" in b and "venv" in b)
    assert test_command in (REPO_ROOT / ".ci" / "run").read_text(encoding="utf-8")


@pytest.mark.parametrize("command", [["ruff", "check", "."], ["ruff", "format", "--check", "."], ["mypy"]])
def test_static_checks_are_clean(command: list[str]) -> None:
    tool = Path(sys.executable).parent / command[0]
    result = subprocess.run([str(tool), *command[1:]], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
