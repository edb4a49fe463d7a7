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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from devtools.net import free_port
from inference.lfw import lfw_dir, shared_dir
from inference.mobilefacenet import WEIGHTS_SUBPATH
from tests import background_suites
from training_jobs.datasets import DEFAULT_EVAL_FOLDS, identity_of, make_split

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "training_jobs" / "federated" / "flower_app"
FEDERATED_PYTHON = ROOT / ".venv-federated" / "bin" / "python"
HAVE_FLWR = importlib.util.find_spec("flwr") is not None
SHARED = shared_dir()
RAW = SHARED / "datasets" / "lfw-raw-fold1"
HAVE_DATA = RAW.is_dir() and (lfw_dir(SHARED) / "pairs.txt").exists() and (SHARED / WEIGHTS_SUBPATH).exists()
PHOTOS_PER_DEVICE = 2


@pytest.mark.slow
@pytest.mark.timeout(2500)  # minutes when the machine is busy: Flower starts a process per message (docs)
@pytest.mark.skipif(HAVE_FLWR, reason="flwr importable here: the deployment test runs directly")
def test_deploy_suite_in_federated_venv():
    if not FEDERATED_PYTHON.exists():
        pytest.skip("no .venv-federated: run scripts/install_federated.sh (make test does)")
    run = background_suites.outcome("test_deploy_suite_in_federated_venv")  # started at collection (conftest)
    assert run.returncode == 0, run.stdout[-11000:]
    summary = run.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, run.stdout[-2000:]




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
        # Flower starts its SuperExec in a new session (outside our process groups): collect every descendant
        # while the tree is intact, so none outlives the test
        family = descendants([proc.pid for proc in self.started])
        for proc in reversed(self.started):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
        deadline = time.monotonic() + 10
        for proc in self.started:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for pid in [proc.pid for proc in self.started] + family:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self.started:
            proc.wait()


def descendants(roots: list[int]) -> list[int]:
    """Every process below `roots` (children, grandchildren, ...), from `ps`."""
    children: dict[int, list[int]] = {}
    for line in subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout.splitlines():
        pid, ppid = map(int, line.split())
        children.setdefault(ppid, []).append(pid)
    found, todo = [], list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


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


@pytest.mark.slow
@pytest.mark.timeout(2000)
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
    processes, gateway = Processes(tmp_path, env), None
    try:
        link = processes.start("superlink", [str(Path(sys.executable).parent / "flower-superlink"), "--insecure",
                                             "--host", "127.0.0.1", "--port", str(superlink),
                                             "--disable-runtime-dependency-installation"])
        wait_for_port(superlink, *link)
        # the gateway (its own venv) starts while the devices join: an admin's jobs with engine deployment
        gateway = start_gateway_job(tmp_path, superlink)
        nodes = {}
        for i, (identity, photos) in enumerate(devices.items()):
            nodes[identity] = processes.start(f"device-{i}", [
                sys.executable, "-m", "privface", "client", "federated", "join", "--superlink",
                f"127.0.0.1:{superlink}", "--insecure", "--client-id", f"dev{i}", "--runtime-port",
                str(free_port()), *map(str, photos)])
        watched = [link, *nodes.values()]
        # few rounds: every message to a device starts a fresh ClientApp process (Flower 1.41), whose
        # imports and model load dominate here (docs/federated.md, "Deployment runtime").
        # FedAvg: an admin's `federated` job with engine deployment, through the gateway (its venv), which
        # submits the Flower App to this SuperLink (the operator's setting), follows the rounds and publishes;
        # its rq worker is killed after round 1 and a new one resumes the job (tests/federated_deploy_job.py)
        fedavg_job = gateway_job_result(gateway, tmp_path, watched)
        fedavg_seconds = time.perf_counter() - started
        runs_after_job = superlink_runs(env)  # before the SecAgg+ run below adds its own
        base = "num-rounds=1 min-nodes=2 clients-per-round=2 seed=0 round-timeout=180.0"
        secagg = run_app(tmp_path, env, "secagg", base + ' aggregation="secagg+"', watched)
        duplicate = refused_run(tmp_path, env, "secagg", base)  # a second run into the SecAgg+ run's directory
    finally:
        if gateway is not None and gateway.poll() is None:  # the gateway side and its job's run die with it
            os.killpg(gateway.pid, signal.SIGKILL)
            gateway.wait()
        processes.stop()

    cancelled = fedavg_job["cancelled"]
    assert "submitted to the SuperLink; waiting for 3 devices" in cancelled["submitted"]["message"], cancelled
    assert cancelled["cancel_status"] == 202 and cancelled["job"]["status"] == "cancelled", (
        cancelled["job"]["status"], cancelled["job"]["message"], fedavg_job["worker_log"][-2000:])
    assert cancelled["job"]["message"] == "cancelled after round 0 of 1", cancelled["job"]
    assert cancelled["models_after"] == cancelled["models_before"]  # nothing published
    job = fedavg_job["job"]
    assert job["status"] == "succeeded", (job, fedavg_job["worker_log"])
    result = job["result"]
    assert result["engine"] == "deployment" and isinstance(result["run_id"], int)
    assert [r["round"] for r in result["rounds"]] == [1, 2]
    for entry in result["rounds"]:
        assert entry["sampled"] == entry["finished"] == 2 and entry["failed"] == 0, result["rounds"]
        assert entry["metrics"]["loss"] > 0, entry
    assert any((snap["message"] or "").startswith("round 1 of 2: 2/2 clients finished, 0 failed, loss ")
               for snap in fedavg_job["live"]), fedavg_job["live"]  # seen while the job was running
    assert_resumed_the_same_run(fedavg_job, cancelled, runs_after_job)
    # published as simulation publishes: held-out folds 6-10 before/after, the active v0's, a registered version
    assert result["heldout"]["before"]["num_pairs"] == result["heldout"]["after"]["num_pairs"] == 10
    assert result["heldout"]["active_version"]["version"] == "v0" and result["active_before"] == "v0"
    decision = result["guardrail"]
    assert decision["decision"] in ("activated", "kept-candidate") and decision["reason"], decision
    assert result["status"] == ("active" if decision["decision"] == "activated" else "candidate")
    models = {m["version"]: m for m in fedavg_job["models"]}
    assert models[result["version"]]["status"] == result["status"]
    assert models[result["version"]]["metrics"]["federated"]["engine"] == "deployment"
    assert models[result["version"]]["metrics"]["federated"]["devices"] == ["device-dev0", "device-dev1"]
    assert secagg["status"] == "finished" and len(secagg["rounds"]) == 1, secagg
    assert secagg["rounds"][0]["replied"] == 2 and secagg["rounds"][0]["failed"] == 0, secagg["rounds"]
    assert secagg["rounds"][0]["replied_clients"] == ["device-dev0", "device-dev1"]
    assert duplicate["status"] == "finished:failed" and not duplicate["report"], duplicate
    assert duplicate["owner"] == secagg_owner(tmp_path) and duplicate["owner"] != duplicate["run_id"], duplicate
    # the global parameters moved: the candidate's weights and the SecAgg+ run's saved state differ from the
    # published model's parameters
    settings = settings_from_run_config({"aggregation": "fedavg", "scope": "whole", "min-nodes": 2,
                                         "clients-per-round": 2, "transform": "dct8-v0", "epsilon": 64.0,
                                         "seed": 0, "round-timeout": 1.0, "num-rounds": 2, "local-epochs": 1,
                                         "batch-size": 4, "max-weight": 4, "state-dir": ""}, SHARED)
    published = {name: array.numpy() for name, array in initial_arrays(settings).items()}
    state = checkpoint.load(tmp_path / "secagg")
    assert state is not None and set(state.arrays) == set(published)
    candidate = candidate_weights(Path(fedavg_job["model_dir"]) / result["version"])
    for name, arrays in (("job", candidate), ("secagg", state.arrays)):
        moved = max(float(np.abs(arrays[k] - published[k]).max()) for k in published)
        assert moved > 1e-5, f"{name}: parameters did not change ({moved})"
    # each device trained on exactly its own identity's faces, and on nothing else
    digests = {identity: faces_digest(photos) for identity, photos in devices.items()}
    for i, (identity, (_, log)) in enumerate(nodes.items()):
        lines = re.findall(r"privface device (\S+): training on (\d+) photos \(faces sha256 (\w+)\)", log.read_text())
        assert len(lines) == 3, log.read_text()[-3000:]  # 2 FedAvg rounds (one run) + 1 SecAgg+ round; none refused
        assert set(lines) == {(f"device-dev{i}", str(PHOTOS_PER_DEVICE), digests[identity])}
    print(f"deployment: FedAvg job 2 rounds {fedavg_seconds:.1f} s from start (processes, worker kill + resume "
          f"and publishing included), worker down {fedavg_job['kill']['down_seconds']:.1f} s, attempt 2 took the "
          f"run over after round {result['resumed'][0]['from_round']} and ran {result['seconds']:.1f} s (publishing "
          f"{result['publish_seconds']:.1f} s), rounds {[round(r['train_seconds'], 1) for r in result['rounds']]} s; "
          f"SecAgg+ 1 round {secagg['wall_seconds']:.1f} s, SecAgg+ up {secagg['rounds'][0]['bytes_up_per_client']}; "
          f"guardrail {decision['decision']}: {decision['reason']}; gateway side (s): "
          f"{ {k: round(v, 1) for k, v in fedavg_job['seconds'].items()} }")


def superlink_runs(env: dict[str, str]) -> list[dict]:
    """Every run the SuperLink holds (`flwr ls`, JSON): what was submitted to it, and how each ended."""
    out = subprocess.run([str(Path(sys.executable).parent / "flwr"), "ls", "local", "--format", "json"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return list(json.loads(out.stdout)["runs"])


def assert_resumed_the_same_run(fedavg_job: dict, cancelled: dict, runs: list[dict]) -> None:
    """The job's rq worker and work-horse were SIGKILLed after round 1: its deploy_run died with them, leaving
    run.json (then removed by the test) and round 1's state; a new worker requeued the job (attempt 2), which
    followed the same run (never a second `flwr run`: the SuperLink holds the cancelled job's run and this one
    only) and finished it."""
    kill, result = fedavg_job["kill"], fedavg_job["job"]["result"]
    assert kill and not kill["deploy_run_left"] and kill["state_saved"], kill  # killed with its worker
    assert kill["work_horses"] == 1, kill  # the job ran in the rq worker's forked work-horse, killed with it
    assert kill["row_while_down"]["status"] == "running", kill  # orphaned, not failed; the gateway still answers
    first = [snap for snap in fedavg_job["live"] if snap["attempt"] == 1]
    submitted = [s["message"] for s in first if "submitted to the SuperLink" in (s["message"] or "")]
    assert submitted and submitted[0] == f"run {result['run_id']} submitted to the SuperLink; waiting for 2 devices"
    assert kill["run_file"] == kill["owner_file"] == {"run-id": result["run_id"]}, (kill, result["run_id"])
    assert [r["round"] for r in first[-1]["rounds"]] == [1], first[-1]  # killed after round 1, before round 2
    assert result["attempts"] == 2, result
    assert len(result["resumed"]) == 1 and result["resumed"][0]["run_id"] == result["run_id"], result["resumed"]
    assert result["resumed"][0]["from_round"] in (1, 2), result["resumed"]  # round 2 ran on while it was down
    cancelled_run = cancelled["submitted"]["result"]["run_id"]
    assert sorted(int(run["run-id"]) for run in runs) == sorted([cancelled_run, result["run_id"]]), runs
    ours = next(run for run in runs if int(run["run-id"]) == result["run_id"])
    assert ours["status"] == "finished:completed", ours


def start_gateway_job(tmp: Path, superlink: int) -> subprocess.Popen:
    """tests/federated_deploy_job.py in the gateway's venv: a gateway whose operator set this SuperLink, an admin
    who cancels a job whose run waits for devices, then runs a `federated` job with engine deployment to the end."""
    gateway_python = Path(os.environ.get("PRIVFACE_GATEWAY_PYTHON") or ROOT / ".venv" / "bin" / "python")
    assert gateway_python.exists(), f"no gateway venv at {gateway_python} (set PRIVFACE_GATEWAY_PYTHON)"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # deploy_run's flwr
    with (tmp / "gateway-job.log").open("wb") as err:
        return subprocess.Popen([str(gateway_python), "-m", "tests.federated_deploy_job", str(tmp / "gateway"),
                                 str(superlink), sys.executable], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=err, start_new_session=True)


def gateway_job_result(proc: subprocess.Popen, tmp: Path, watched) -> dict:
    """The gateway side's JSON summary once it has finished (its process group is killed if it hangs)."""
    try:
        out, _ = proc.communicate(timeout=1700)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log = tmp / "gateway-job.log"
    for device, device_log in watched[1:]:
        assert device.poll() is None, f"{device_log.name} exited: {device_log.read_text()[-3000:]}"
    assert proc.returncode == 0, log.read_text()[-4000:]
    return dict(json.loads(out.decode().strip().splitlines()[-1]))


def candidate_weights(version_dir: Path) -> dict[str, np.ndarray]:
    """The exported candidate's PyTorch weights (saved beside its ONNX file), as numpy arrays."""
    import torch

    from inference.export import saved_weights

    found = saved_weights(version_dir)
    assert found is not None, f"{version_dir} has no saved weights"
    state = torch.load(found[0], map_location="cpu", weights_only=True)
    return {name: tensor.numpy() for name, tensor in state.items()}


def run_app(tmp: Path, env: dict[str, str], name: str, config: str, watched) -> dict:
    """`flwr run` of the Flower App against the SuperLink, then wait for the ServerApp's report."""
    report = tmp / f"{name}.json"
    run = subprocess.run([str(Path(sys.executable).parent / "flwr"), "run", str(APP), "local", "--run-config",
                          f'{config} report="{report}" state-dir="{tmp / name}"'], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "Successfully started run" in run.stdout, run.stdout + run.stderr
    return wait_for_report(report, 900, watched)


def secagg_owner(tmp: Path) -> int:
    return int(json.loads((tmp / "secagg" / "owner.json").read_text())["run-id"])


def refused_run(tmp: Path, env: dict[str, str], claimed: str, config: str) -> dict:
    """`flwr run` of the app into a state directory another run owns: its ServerApp must refuse before any round
    (the devices' logs then show no training for it) and write no report; returns how the run ended."""
    report, owner = tmp / "duplicate.json", secagg_owner(tmp)
    run = subprocess.run([str(Path(sys.executable).parent / "flwr"), "run", str(APP), "local", "--format", "json",
                          "--run-config", f'{config} report="{report}" state-dir="{tmp / claimed}"'], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    run_id = int(json.loads(run.stdout)["run-id"])
    deadline, status = time.monotonic() + 180, ""
    while time.monotonic() < deadline and not status.startswith("finished"):
        time.sleep(2)
        status = next(r["status"] for r in superlink_runs(env) if int(r["run-id"]) == run_id)
    return {"run_id": run_id, "status": status, "report": report.exists(), "owner": owner}


def join_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "privface", "client", "federated", "join", *args], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.skipif(HAVE_FLWR, reason="checks the venv without Flower")
def test_join_without_flower_says_where_flower_is_in_one_line(tmp_path: Path):
    proc = join_cli("--superlink", "127.0.0.1:9092", "--insecure", str(tmp_path / "me.jpg"))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and ".venv-federated" in proc.stderr and "make install-federated" in proc.stderr


@pytest.mark.skipif(not HAVE_FLWR or not HAVE_DATA, reason="needs flwr (.venv-federated) and the LFW data")
def test_join_refuses_bad_input_in_one_line_and_starts_nothing(tmp_path: Path):
    photo = str(next(iter(device_photos(1).values()))[0])
    blank = tmp_path / "blank.png"
    import cv2

    cv2.imwrite(str(blank), np.full((200, 200, 3), 128, np.uint8))
    cases = {"--superlink must be HOST:PORT": ["--superlink", "http://127.0.0.1:9092", "--insecure", photo],
             "no such file": ["--superlink", "127.0.0.1:9092", "--insecure", str(tmp_path / "missing.jpg")],
             "face": ["--superlink", "127.0.0.1:9092", "--insecure", str(blank)],
             "--client-id": ["--superlink", "127.0.0.1:9092", "--insecure", "--client-id", "a b", photo],
             "not allowed with": ["--superlink", "127.0.0.1:9092", "--insecure", "--root-certificates", photo, photo]}
    # the five refusals run side by side (each a process start: imports, the detector for "face")
    with ThreadPoolExecutor(len(cases)) as pool:
        procs = dict(zip(cases, pool.map(lambda args: join_cli(*args), cases.values())))
    for expected, args in cases.items():
        proc = procs[expected]
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
        assert expected in proc.stderr, (expected, proc.stderr)


@pytest.mark.skipif(not HAVE_FLWR, reason="needs flwr (.venv-federated)")
def test_a_deployment_job_whose_superlink_is_unreachable_fails_in_one_line_and_exports_nothing(tmp_path: Path):
    """What the gateway's job runs (engine deployment) against a SuperLink that is down: exit 1, the last stderr
    line (the job's one-line reason) says why, no run id is kept and no candidate is exported."""
    closed = free_port()
    proc = subprocess.run([sys.executable, "-m", "training_jobs.federated.deploy_run", "--superlink",
                           f"127.0.0.1:{closed}", "--insecure", "--rounds", "1", "--state-dir", str(tmp_path / "state"),
                           "--export-dir", str(tmp_path / "models"), "--version", "fed-x", "--progress"], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT),
                               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"},
                          capture_output=True, text=True, timeout=300)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and last.startswith("DeploymentError: flwr run failed: "), proc.stderr[-2000:]
    assert "Connection to the SuperLink is unavailable" in last and '"event": "result"' not in proc.stdout
    assert not (tmp_path / "state" / "run.json").exists() and not (tmp_path / "models").exists()


@pytest.mark.skipif(not HAVE_FLWR, reason="needs flwr (.venv-federated)")
def test_run_config_is_checked_before_any_round():
    from training_jobs.federated.deploy import settings_from_run_config

    good = {"aggregation": "secagg+", "scope": "adapter-tail", "min-nodes": 5, "clients-per-round": 3,
            "transform": "dct8-v0", "epsilon": 64.0, "seed": -1, "round-timeout": 30.0, "num-rounds": 2,
            "local-epochs": 1, "batch-size": 4, "max-weight": 4, "state-dir": ""}
    settings = settings_from_run_config(good, SHARED)
    assert settings.seed is None and settings.round_timeout == 30.0 and settings.secagg["timeout"] == 30.0
    assert settings.heldout_pairs_per_fold == 0  # optional in a run config: no held-out evaluation per round
    assert settings_from_run_config({**good, "heldout-pairs-per-fold": 20}, SHARED).heldout_pairs_per_fold == 20
    assert settings.state_dir is None and settings.num_clients == 5 and settings.clients_per_round == 3
    for key, bad in (("aggregation", "median"), ("scope", "all"), ("clients-per-round", 6)):
        with pytest.raises(ValueError, match=key.split("-")[0]):
            settings_from_run_config({**good, key: bad}, SHARED)


@pytest.mark.skipif(not HAVE_FLWR, reason="needs flwr (.venv-federated)")
def test_the_job_follows_the_run_that_owns_its_state_and_a_failed_serverapp_ends_it_in_one_line(tmp_path: Path):
    """What deploy_run reads from the state directory, without a SuperLink: the owner file wins over the run it
    submitted (run.json is rewritten, one `submitted` event says so), and a ServerApp's report that it failed
    ends the job with that reason (the report is read before the SuperLink is asked anything)."""
    import contextlib
    import io

    from training_jobs.federated import checkpoint
    from training_jobs.federated.deploy_run import DeploymentError, follow, take_over

    assert take_over(tmp_path, 9) == 9 and not (tmp_path / "run.json").exists()  # nobody claimed it yet
    checkpoint.claim(tmp_path, 4)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert take_over(tmp_path, 9) == 4
    assert json.loads((tmp_path / "run.json").read_text()) == {"run-id": 4}
    event = json.loads(printed.getvalue())
    assert event["event"] == "submitted" and event["run_id"] == 4 and event["duplicate_run"] == 9, event
    (tmp_path / "report.json").write_text(json.dumps({"status": "failed: RuntimeError: no device replied"}))
    with pytest.raises(DeploymentError, match="^the ServerApp stopped: failed: RuntimeError: no device replied$"):
        follow(tmp_path / "no-flwr-home", 4, tmp_path, rounds=1, poll_s=0.0)


def write_tls_and_node_keys(folder: Path) -> dict[str, Path]:
    """A CA, a SuperLink certificate for 127.0.0.1 signed by it, and two devices' EC P-384 keys (OpenSSH)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "privface test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + datetime.timedelta(1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    server = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
              .issuer_name(ca_name).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now).not_valid_after(now + datetime.timedelta(1))
              .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                          x509.DNSName("localhost")]), critical=False)
              .sign(ca_key, hashes.SHA256()))
    paths = {"ca": folder / "ca.pem", "cert": folder / "superlink.pem", "key": folder / "superlink.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    for device in ("registered", "stranger"):
        key = ec.generate_private_key(ec.SECP384R1())
        paths[device] = folder / device
        paths[device].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                    serialization.NoEncryption()))
        paths[device].chmod(0o600)
        paths[f"{device}.pub"] = folder / f"{device}.pub"
        paths[f"{device}.pub"].write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                         serialization.PublicFormat.OpenSSH))
    return paths


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.skipif(not HAVE_FLWR or not HAVE_DATA, reason="needs flwr (.venv-federated) and the LFW data")
def test_over_tls_only_a_registered_device_is_admitted(tmp_path: Path):
    """The README's commands for real devices: a TLS SuperLink with SuperNode authentication; a device whose
    key the operator registered (`flwr supernode register`) joins, a device with an unknown key is refused."""
    keys = write_tls_and_node_keys(tmp_path)
    photo = str(next(iter(device_photos(1).values()))[0])
    port = free_port()
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
                                      f'address = "127.0.0.1:{port}"\nroot-certificates = "{keys["ca"]}"\n')
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "PYTHONPATH": str(ROOT), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    processes = Processes(tmp_path, env)
    try:
        link, link_log = processes.start("superlink", [
            str(Path(sys.executable).parent / "flower-superlink"), "--host", "127.0.0.1", "--port", str(port),
            "--ssl-ca-certfile", str(keys["ca"]), "--ssl-certfile", str(keys["cert"]), "--ssl-keyfile",
            str(keys["key"]), "--enable-supernode-auth", "--disable-runtime-dependency-installation"])
        wait_for_port(port, link, link_log)
        register = subprocess.run([str(Path(sys.executable).parent / "flwr"), "supernode", "register",
                                   str(keys["registered.pub"]), "local"], env=env, capture_output=True, text=True,
                                  timeout=120)
        assert register.returncode == 0, register.stdout + register.stderr
        devices = {}
        for name in ("registered", "stranger"):
            devices[name] = processes.start(name, [
                sys.executable, "-m", "privface", "client", "federated", "join", "--superlink", f"127.0.0.1:{port}",
                "--root-certificates", str(keys["ca"]), "--auth-key", str(keys[name]), "--runtime-port",
                str(free_port()), "--max-wait-time", "60", photo])
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and ("Activated node_id" not in link_log.read_text()
                                               or devices["stranger"][0].poll() is None):
            time.sleep(1)
        assert link_log.read_text().count("Activated node_id") == 1, link_log.read_text()[-3000:]
        assert devices["registered"][0].poll() is None, devices["registered"][1].read_text()[-3000:]
        assert devices["stranger"][0].poll() not in (None, 0), devices["stranger"][1].read_text()[-3000:]
        assert "Failed to activate SuperNode" in devices["stranger"][1].read_text()
    finally:
        processes.stop()


@pytest.mark.skipif(not HAVE_FLWR, reason="needs flwr (.venv-federated)")
def test_a_device_drops_the_servers_seed_so_its_noise_comes_from_the_os():
    from types import SimpleNamespace

    from flwr.app import ConfigRecord, Context, RecordDict

    from training_jobs.federated.client_app import round_rng
    from training_jobs.federated.deploy import ignore_server_seed

    content = RecordDict({"config": ConfigRecord({"seed": 0, "server-round": 1, "epochs": 1}),
                          "fitins.config": ConfigRecord({"seed": 0, "server-round": 1})})
    message = SimpleNamespace(content=content)  # the mod reads only the content (a Message needs a live run)
    seen = {}

    def app(msg, context: Context):
        seen.update({name: dict(record) for name, record in msg.content.config_records.items()})
        return msg

    ignore_server_seed(message, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}), app)
    assert seen == {"config": {"server-round": 1, "epochs": 1}, "fitins.config": {"server-round": 1}}
    draws = {tuple(round_rng(seen["config"], 0).integers(0, 2**62, 4)) for _ in range(3)}
    assert len(draws) == 3  # unseeded: every draw differs (seeded, all three would be equal)
