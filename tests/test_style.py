"""One formatter: `ruff format` and `ruff check` are clean with the settings in pyproject.toml (the version is pinned
in constraints-cpu.txt, so every machine formats alike)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("command", [["format", "--check"], ["check"]])
def test_ruff_is_clean(command):
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    result = subprocess.run([ruff, *command, "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"ruff {' '.join(command)} is not clean:\n{result.stdout}{result.stderr}"
