"""The API schema: generated code is current, and buf lint passes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from switchboard.protogen import REPO_ROOT, generate


def test_generated_code_matches_the_protos(tmp_path: Path) -> None:
    generated = generate(tmp_path)
    assert generated, "nothing was generated"
    stale = [str(p) for p in generated if (tmp_path / p).read_bytes() != (REPO_ROOT / p).read_bytes()]
    assert not stale, f"regenerate with `python -m switchboard.protogen`: {stale}"


@pytest.fixture(scope="session")
def buf() -> str:
    """The pinned buf CLI from npm (package.json pins the exact version); installed if missing.

    ``npm install``, not ``npm ci``: npm 11 writes lock files without the other
    platforms' optional buf binaries and then refuses ``npm ci`` on them.
    """
    binary = REPO_ROOT / "node_modules" / ".bin" / "buf"
    if not binary.exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("npm is not installed: buf (npm package @bufbuild/buf) cannot be installed")
        subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--ignore-scripts"],
            cwd=REPO_ROOT,
            check=True,
            capture_output=True,
        )
    return str(binary)


def test_buf_lint_passes(buf: str) -> None:
    result = subprocess.run([buf, "lint"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_build_compiles_every_proto(buf: str, tmp_path: Path) -> None:
    image = tmp_path / "image.binpb"
    result = subprocess.run([buf, "build", "-o", str(image)], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert image.stat().st_size > 0
