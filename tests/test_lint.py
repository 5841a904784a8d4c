"""The linters are part of the test suite: ruff and mypy, each with the configuration in pyproject.toml.

``./run test`` installs both (the ``dev`` extra), so a lint finding fails the suite like any other
regression rather than waiting for someone to run the tools by hand. The findings are in the failure
message, one per line, as the tools print them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# What ruff checks: every Python tree of the project (native/ and .tools/ are excluded in pyproject).
RUFF_PATHS = ["cogbert_edge", "cogbert_cloud", "benchmarks", "tests", "examples"]


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_ruff_is_clean() -> None:
    proc = _run("ruff", "check", "--no-fix", "--output-format", "concise", *RUFF_PATHS, timeout=120)
    assert proc.returncode == 0, f"ruff check found problems:\n{proc.stdout}{proc.stderr}"


@pytest.mark.slow
def test_mypy_is_clean() -> None:
    # No file arguments: pyproject's [tool.mypy] lists what is checked (the three packages).
    proc = _run("mypy", timeout=280)
    assert proc.returncode == 0, f"mypy found problems:\n{proc.stdout}{proc.stderr}"
