"""mypy (pyproject.toml [tool.mypy]) over every package in the test command: a wrong type in a rarely run path fails
here instead of in production. Strict everywhere (research code in training_jobs/ included) but benchmarks and tests
(bench/, tests/), where annotations are checked but unannotated helpers and bare generics are allowed (tests/ is not in
`files` yet: pyproject.toml counts what is left)."""
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


RELAXED = {"bench.*", "tests.*"}
# flwr is only in .venv-federated, so where mypy runs Flower's base classes and decorators are Any: the modules built
# on them may subclass and decorate with Any, and nothing else is relaxed in training_jobs
FLOWER_RELAXED_FLAGS = {"disallow_untyped_decorators", "disallow_subclassing_any"}
NOT_YET_CHECKED = {"tests"}  # pyproject.toml says how far each is from clean


def top_level_packages() -> set[str]:
    """Every folder of the repository that holds Python code (hidden folders and outputs aside)."""
    return {p.name for p in ROOT.iterdir()
            if p.is_dir() and not p.name.startswith(".") and p.name != "var" and any(p.rglob("*.py"))}


def test_every_package_is_checked() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    assert {"app", "secure", "inference", "training_jobs", "tests"} <= top_level_packages()
    assert top_level_packages() - NOT_YET_CHECKED <= set(config["files"])


def test_strict_everywhere_but_the_named_relaxed_packages() -> None:
    """`strict` is global: in an override section mypy would apply it to every module anyway (python/mypy#11401),
    so the config says so, and only benchmarks and tests relax it, flag by flag."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    assert config["strict"] is True
    assert not any("strict" in override for override in config["overrides"])
    relaxed = [o for o in config["overrides"] if o.get("disallow_untyped_defs") is False]
    relaxed_modules = {m for o in relaxed for m in o["module"]}
    assert relaxed_modules <= RELAXED | {"inference.export"}, relaxed_modules


def test_training_jobs_relaxes_only_what_flower_forces() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    for override in config["overrides"]:
        if any(module.startswith("training_jobs") for module in override["module"]):
            assert set(override) - {"module"} <= FLOWER_RELAXED_FLAGS, override
            assert all(module.startswith("training_jobs.federated.") for module in override["module"]), override
