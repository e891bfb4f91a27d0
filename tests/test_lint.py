"""The code base is ruff clean (the configuration is in pyproject.toml)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_clean() -> None:
    if shutil.which("ruff") is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]' installs it)")
    r = subprocess.run(
        ["ruff", "check", "src", "tests", "bench"], cwd=ROOT, capture_output=True, text=True
    )
    sys.stdout.write(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
