"""The Flower test files, rerun in .venv-federated, started in the background when the session starts.

Flower lives only in .venv-federated, so `test_flower_suite_in_federated_venv` and
`test_deploy_suite_in_federated_venv` rerun their files there in a subprocess. Those runs take minutes (Ray
simulations, a SuperLink with a process per message) and mostly wait on process start-up, so the conftest starts
them when the wrapper tests are collected and the wrappers only collect the outcome: the rest of the suite runs
meanwhile. They use their own temporary folders and free ports, no PostgreSQL, and Redis only in a database no other
test uses (the deployment job's rq worker, 15), so they cannot disturb the tests running beside them. A wrapper whose run was not started (e.g. `-p no:...` or a deselected
sibling) starts it itself, so every path still runs the Flower tests.

The session runs its tests in parallel processes (pytest-xdist), so a run is known by files, not by a process's
memory: the session's controller names a folder (RUNS_DIR_ENV, inherited by every worker); the first process to
create `<wrapper>.pid` there (exclusive create) starts the run, which writes `<wrapper>.log` and, when it ends,
`<wrapper>.rc`; the wrapper test, in whichever worker, waits for the `.rc`. The controller kills what is left
at the end of the session.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FEDERATED_PYTHON = ROOT / ".venv-federated" / "bin" / "python"
RUNS_DIR_ENV = "PRIVFACE_TEST_BACKGROUND_DIR"

# wrapper test name -> (test file, its -k expression, seconds it may take)
SUITES = {
    "test_flower_suite_in_federated_venv": ("tests/test_federated.py", "not flower_suite", 900),
    "test_deploy_suite_in_federated_venv": ("tests/test_federated_deploy.py",
                                            "not suite_in_federated_venv and not without_flower", 2400),
}


@dataclass(frozen=True)
class Outcome:
    returncode: int
    stdout: str
    seconds: float


def runs_dir() -> Path:
    """The session's folder of background runs (made by the controller; a process started without one, e.g. a
    test run by hand outside pytest's session hooks, makes its own)."""
    if not os.environ.get(RUNS_DIR_ENV):
        os.environ[RUNS_DIR_ENV] = tempfile.mkdtemp(prefix="privface-fedsuites-")
    return Path(os.environ[RUNS_DIR_ENV])


def _env() -> dict[str, str]:
    """This checkout importable; the deployment test's gateway runs in this venv; the detector's model file of
    this venv (an older .venv-federated may lack it)."""
    from client.detect import yunet_model_path

    env = {**os.environ, "PYTHONPATH": str(ROOT), "PRIVFACE_GATEWAY_PYTHON": sys.executable}
    if yunet_model_path().is_file():
        env.setdefault("PRIVFACE_YUNET_PATH", str(yunet_model_path()))
    return env


def start(wrapper: str) -> None:
    """Start the run of ``wrapper``'s file unless a process of this session already did."""
    if not FEDERATED_PYTHON.exists():  # the wrappers skip, saying how to install it
        return
    folder = runs_dir()
    try:
        claim = os.open(folder / f"{wrapper}.pid", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    path, keyword, _ = SUITES[wrapper]
    command = [str(FEDERATED_PYTHON), "-m", "pytest", "-q", "--noconftest", "-p", "no:cacheprovider",
               "-k", keyword, str(ROOT / path)]
    rc = folder / f"{wrapper}.rc"
    script = f"{shlex.join(command)}; echo $? > {shlex.quote(str(rc))}.tmp && mv {shlex.quote(str(rc))}.tmp " \
             f"{shlex.quote(str(rc))}"
    with open(folder / f"{wrapper}.log", "w") as log:
        proc = subprocess.Popen(["sh", "-c", script], cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    os.write(claim, f"{proc.pid} {time.time()}".encode())
    os.close(claim)


def outcome(wrapper: str) -> Outcome:
    """The run's outcome (started here if no process of the session started it), its group killed past its
    time limit."""
    start(wrapper)
    folder, limit = runs_dir(), SUITES[wrapper][2]
    pid_file, rc = folder / f"{wrapper}.pid", folder / f"{wrapper}.rc"
    deadline = time.monotonic() + 60
    while not pid_file.read_text().strip():  # the starter writes it right after Popen
        if time.monotonic() > deadline:
            return Outcome(-1, f"the process that claimed {pid_file} never started the run", 0.0)
        time.sleep(0.1)
    pid, started = pid_file.read_text().split()
    while not rc.exists() and time.time() - float(started) < limit:
        time.sleep(1)
    if not rc.exists():
        _kill(int(pid))
    code = int(rc.read_text()) if rc.exists() else -signal.SIGKILL
    return Outcome(code, (folder / f"{wrapper}.log").read_text(), time.time() - float(started))


def _kill(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop_all() -> None:
    """End of the session (its controller): a run nobody asked for (its wrapper failed before asking) is killed,
    not left behind, and the folder removed."""
    folder = Path(os.environ.get(RUNS_DIR_ENV, ""))
    if not os.environ.get(RUNS_DIR_ENV) or not folder.is_dir():
        return
    for pid_file in folder.glob("*.pid"):
        text = pid_file.read_text().split()
        if text and not pid_file.with_suffix(".rc").exists():
            _kill(int(text[0]))
    for entry in folder.iterdir():
        entry.unlink()
    folder.rmdir()
