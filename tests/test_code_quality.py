"""The code stays as the project keeps it: ruff clean and formatted, levers type-checked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKED = ["src", "tests", "examples", "bench", "bin/make-examples"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, check=False
    )


def test_ruff_finds_nothing() -> None:
    result = run("ruff", "check", *[p for p in CHECKED if (ROOT / p).exists()])
    assert result.returncode == 0, result.stdout


def test_code_is_formatted() -> None:
    result = run("ruff", "format", "--check", *[p for p in CHECKED if (ROOT / p).exists()])
    assert result.returncode == 0, result.stdout


def test_levers_type_checks() -> None:
    result = run("mypy", "src/levers", "--ignore-missing-imports")
    assert result.returncode == 0, result.stdout
