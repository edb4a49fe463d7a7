"""The Flower test files, rerun in .venv-federated, started in the background when the session starts.

Flower lives only in .venv-federated, so `test_flower_suite_in_federated_venv` and
`test_deploy_suite_in_federated_venv` rerun their files there in a subprocess. Those runs take minutes (Ray
simulations, a SuperLink with a process per message) and mostly wait on process start-up, so the conftest starts
them when the wrapper tests are collected and the wrappers only collect the outcome: the rest of the suite runs
meanwhile on the other core. They use their own temporary folders and free ports and neither Redis nor PostgreSQL,
so they cannot disturb the tests running beside them. A wrapper whose run was not started (e.g. `-p no:...` or a
deselected sibling) starts it itself, so every path still runs the Flower tests.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FEDERATED_PYTHON = ROOT / ".venv-federated" / "bin" / "python"


@dataclass(frozen=True)
class Outcome:
    returncode: int
    stdout: str
    seconds: float


class BackgroundRun:
    """One pytest run in .venv-federated whose output goes to a file until a wrapper test asks for it."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self._log = tempfile.NamedTemporaryFile("w+", prefix="privface-fedsuite-", suffix=".log", delete=False)
        self._started = time.monotonic()
        self._proc = subprocess.Popen([str(FEDERATED_PYTHON), "-m", "pytest", "-q", "--noconftest", "-p",
                                       "no:cacheprovider", *argv], cwd=ROOT, env=env, stdout=self._log,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def outcome(self, timeout: float) -> Outcome:
        """Wait for the run (killing its process group past ``timeout``) and read what it printed."""
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill()
        self._log.seek(0)
        text = self._log.read()
        return Outcome(self._proc.returncode, text, time.monotonic() - self._started)

    def _kill(self) -> None:
        if self._proc.poll() is None:
            os.killpg(self._proc.pid, 9)
            self._proc.wait()

    def stop(self) -> None:
        self._kill()
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)


# wrapper test name -> (test file, its -k expression, seconds it may take)
SUITES = {
    "test_flower_suite_in_federated_venv": ("tests/test_federated.py", "not flower_suite", 900),
    "test_deploy_suite_in_federated_venv": ("tests/test_federated_deploy.py",
                                            "not suite_in_federated_venv and not without_flower", 2400),
}
_RUNS: dict[str, BackgroundRun] = {}


def _env() -> dict[str, str]:
    """This checkout importable; the deployment test's gateway runs in this venv; the detector's model file of
    this venv (an older .venv-federated may lack it)."""
    from client.detect import yunet_model_path

    env = {**os.environ, "PYTHONPATH": str(ROOT), "PRIVFACE_GATEWAY_PYTHON": sys.executable}
    if yunet_model_path().is_file():
        env.setdefault("PRIVFACE_YUNET_PATH", str(yunet_model_path()))
    return env


def start(wrapper: str) -> None:
    """Start the run of ``wrapper``'s file now unless it is already running (the conftest calls this once the
    session's tests are known)."""
    if wrapper not in _RUNS and FEDERATED_PYTHON.exists():
        path, keyword, _ = SUITES[wrapper]
        _RUNS[wrapper] = BackgroundRun(["-k", keyword, str(ROOT / path)], _env())


def outcome(wrapper: str) -> Outcome:
    """The run's outcome, started here if the session did not start it."""
    start(wrapper)
    return _RUNS[wrapper].outcome(timeout=SUITES[wrapper][2])


def stop_all() -> None:
    """End of session: a run nobody asked for (its wrapper failed before asking) is killed, not left behind."""
    for run in _RUNS.values():
        run.stop()
    _RUNS.clear()
