"""The gateway's side of tests/test_federated_deploy.py: an admin runs a `federated` job with engine deployment.

Runs in the gateway's venv (Flower is not there), started by the deployment test once its SuperLink and two
devices are up:  python -m tests.federated_deploy_job WORKDIR SUPERLINK_PORT FEDERATED_PYTHON
A gateway (SQLite; no party is needed for admin jobs) and an rq worker on a Redis database of their own (the
production backend: the gateway queues, `privface worker` runs), whose operator settings name the loopback
SuperLink; the admin activates v0, POSTs the job, polls it to the end and prints one JSON line: the final job, the
live snapshots it saw, and the model list.

The job has 2 rounds and its worker is killed after round 1: once the job shows round 1 (saved by the ServerApp),
the rq worker and its work-horse get SIGKILL (a crashed machine), the job's deploy_run dies with them while the run
goes on on the SuperLink, and a new worker requeues the job once its lease has expired; the second attempt must
follow the same run to the end. run.json is removed after the kill, as if the worker had died between `flwr run`
and writing it: the second attempt must find the run by the owner file its ServerApp wrote.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import redis

from devtools.localstack import MODEL_CACHE, QUICK_EXPORT, LocalStack

ROOT = Path(__file__).resolve().parents[1]

PARAMS = {"engine": "deployment", "rounds": 1, "clients": 2, "clients_per_round": 2, "max_images": 2,
          "pairs_per_fold": 2, "seed": 0}
ROUNDS = 2  # the published job: its worker is killed after round 1
LEASE_S = 10  # a killed worker's job is requeued this long after its last heartbeat (every third of it)
# Its own Redis database: the conftest's stacks use 7..14 (tests/conftest.py), and a worker of another test on
# the same queue would take this test's jobs. Flushed before and after.
REDIS_URL = os.environ.get("PRIVFACE_TEST_DEPLOY_REDIS", "redis://127.0.0.1:6379/15")


def main(workdir: Path, superlink_port: int, federated_python: str, timeout: float = 1500.0) -> dict:
    started, seconds = time.monotonic(), {}
    models = workdir / "models"
    LocalStack(workdir / "bootstrap").cli("models", "ensure")  # exports v0 into MODEL_CACHE when absent
    shutil.copytree(MODEL_CACHE / "v0", models / "v0")
    queue = redis.Redis.from_url(REDIS_URL)
    queue.flushdb()
    stack = LocalStack(workdir / "stack", model_dir=models, redis_url=REDIS_URL, extra_env={
        "PRIVFACE_FEDERATED_SUPERLINK": f"127.0.0.1:{superlink_port}", "PRIVFACE_FEDERATED_SUPERLINK_INSECURE": "1",
        "PRIVFACE_FEDERATED_PYTHON": federated_python, "PRIVFACE_FEDERATED_STATE_DIR": str(workdir / "fed"),
        "PRIVFACE_JOB_LEASE_S": str(LEASE_S), **QUICK_EXPORT})
    stack.cli("models", "ensure")  # registers the private copy of v0 in this gateway's database
    workers: list[subprocess.Popen] = []
    try:
        stack.start_gateway_alone()
        workers.append(stack.start_worker("worker-1"))
        seconds["gateway_up"] = time.monotonic() - started
        headers = {"Authorization": f"Bearer {stack.api_key('admin')}"}
        httpx.post(stack.url + "/v1/admin/models/v0/activate", headers=headers, timeout=60).raise_for_status()
        mark = time.monotonic()
        cancelled = cancel_while_waiting(stack.url, headers)
        seconds["cancelled_job"], mark = time.monotonic() - mark, time.monotonic()
        created = httpx.post(stack.url + "/v1/admin/jobs", headers=headers, timeout=60,
                             json={"kind": "federated", "params": {**PARAMS, "rounds": ROUNDS}})
        assert created.status_code == 202, created.text
        job_id, live, job, kill = created.json()["id"], [], {}, {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = httpx.get(f"{stack.url}/v1/admin/jobs/{job_id}", headers=headers, timeout=30).json()
            details = job["result"] or {}
            if job["status"] == "running":
                live.append({"message": job["message"], "rounds": details.get("rounds") or [],
                             "attempt": details.get("attempt")})
            if job["status"] == "running" and details.get("rounds") and not kill:  # round 1 is saved
                kill = kill_and_replace_worker(stack, workers, workdir / "fed" / job_id, headers, job_id)
            if job["status"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(1.0)
        seconds["job"] = time.monotonic() - mark
        listed = httpx.get(stack.url + "/v1/admin/models", headers=headers, timeout=30).json()
        return {"job": job, "live": live, "kill": kill, "cancelled": cancelled, "seconds": seconds, "models": listed,
                "model_dir": str(models), "worker_log": worker_logs(stack)[-4000:]
                if job.get("status") != "succeeded" or cancelled["job"].get("status") != "cancelled" else ""}
    finally:
        stack.stop()  # the workers and their work-horses too
        queue.flushdb()


def deploy_runs(state_dir: Path) -> list[str]:
    """Live deploy_run processes working on `state_dir` (ps, not zombies)."""
    out = subprocess.run(["ps", "-eo", "pid=,stat=,args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines()
            if str(state_dir) in line and "training_jobs.federated.deploy_run" in line and " Z" not in line[:12]]


def worker_logs(stack: LocalStack) -> str:
    return "\n".join(path.read_text(errors="replace") for path in sorted(stack.workdir.glob("worker-*.log")))


def kill_and_replace_worker(stack: LocalStack, workers: list[subprocess.Popen], state_dir: Path,
                            headers: dict[str, str], job_id: str) -> dict:
    """SIGKILL the rq worker running the job and its work-horse (as a crashed machine would): the job's deploy_run
    must die with them and leave the run id and round 1's state behind; the gateway keeps answering, the row stays
    `running`; then a new worker. Returns what was seen."""
    killed_at, worker = time.monotonic(), workers[-1]
    horses = subprocess.run(["pgrep", "-P", str(worker.pid)], capture_output=True, text=True).stdout.split()
    for pid in [worker.pid, *map(int, horses)]:
        os.kill(pid, signal.SIGKILL)
    worker.wait()
    while deploy_runs(state_dir) and time.monotonic() < killed_at + 30:
        time.sleep(0.5)
    seen = {"work_horses": len(horses), "deploy_run_left": deploy_runs(state_dir),
            "run_file": json.loads((state_dir / "run.json").read_text()),
            "owner_file": json.loads((state_dir / "owner.json").read_text()),
            "state_saved": (state_dir / "state.npz").exists(),
            "row_while_down": httpx.get(f"{stack.url}/v1/admin/jobs/{job_id}", headers=headers, timeout=30).json()}
    # the worst moment to die: after `flwr run`, before run.json; what that leaves is this directory without it
    (state_dir / "run.json").unlink()
    workers.append(stack.start_worker(f"worker-{len(workers) + 1}"))
    seen["down_seconds"] = time.monotonic() - killed_at
    return seen


def wait_job(url: str, headers: dict[str, str], job_id: str, done, timeout: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job: dict = httpx.get(f"{url}/v1/admin/jobs/{job_id}", headers=headers, timeout=30).json()
        if done(job) or time.monotonic() > deadline:
            return job
        time.sleep(0.5)


def cancel_while_waiting(url: str, headers: dict[str, str]) -> dict:
    """A job whose run waits for 3 devices (only 2 exist) is cancelled once its run is on the SuperLink: the
    job ends `cancelled` (deploy_run stops the run with `flwr stop`) and publishes nothing."""
    before = httpx.get(url + "/v1/admin/models", headers=headers, timeout=30).json()
    job_id = httpx.post(url + "/v1/admin/jobs", headers=headers, timeout=60,
                        json={"kind": "federated", "params": {**PARAMS, "clients": 3}}).json()["id"]
    submitted = wait_job(url, headers, job_id, lambda j: "submitted to the SuperLink" in (j["message"] or "")
                         or j["status"] in ("succeeded", "failed", "cancelled"))
    cancel = httpx.post(f"{url}/v1/admin/jobs/{job_id}/cancel", headers=headers, timeout=30)
    job = wait_job(url, headers, job_id, lambda j: j["status"] in ("succeeded", "failed", "cancelled"))
    return {"submitted": submitted, "cancel_status": cancel.status_code, "job": job, "models_before": before,
            "models_after": httpx.get(url + "/v1/admin/models", headers=headers, timeout=30).json()}


if __name__ == "__main__":
    out = main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
    print(json.dumps(out, default=str))
