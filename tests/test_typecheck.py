"""mypy (pyproject.toml [tool.mypy]: strict on privface/, common/, inference/, secure/) in the test command: a wrong type
in a rarely run path fails here instead of in production."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_finds_nothing() -> None:
    mypy = shutil.which("mypy") or str(Path(sys.executable).parent / "mypy")
    if not Path(mypy).exists():
        pytest.fail("mypy is not installed: scripts/install.sh installs the dev extra, which includes it")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([mypy, "--no-error-summary", "--python-executable", sys.executable], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_strict_packages_are_strict_and_checked() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    strict = next(o["module"] for o in config["overrides"] if o.get("strict"))
    assert {"privface.*", "common.*", "inference.*", "secure.*"} <= set(strict)
    assert {"privface", "common", "inference", "secure"} <= set(config["files"])
