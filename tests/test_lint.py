"""The linter runs with the tests, so `.ci/run` (the README's test command) fails on a lint error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    completed = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(REPO)],
                               capture_output=True, text=True, cwd=REPO, timeout=120)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-2000:]
