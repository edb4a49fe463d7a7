"""The gateway's side of tests/test_federated_deploy.py: an admin runs a `federated` job with engine deployment.

Runs in the gateway's venv (Flower is not there), started by the deployment test once its SuperLink and two
devices are up:  python -m tests.federated_deploy_job WORKDIR SUPERLINK_PORT FEDERATED_PYTHON
A gateway alone (SQLite, no Redis: the gateway runs the job in-process; no party is needed for admin jobs) whose
operator settings name the loopback SuperLink; the admin activates v0, POSTs the job, polls it to the end and
prints one JSON line: the final job, the live snapshots it saw, and the model list.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import httpx

from devtools.localstack import MODEL_CACHE, LocalStack

PARAMS = {"engine": "deployment", "rounds": 1, "clients": 2, "clients_per_round": 2, "max_images": 2,
          "pairs_per_fold": 2, "seed": 0}


def main(workdir: Path, superlink_port: int, federated_python: str, timeout: float = 1500.0) -> dict:
    started, seconds = time.monotonic(), {}
    models = workdir / "models"
    LocalStack(workdir / "bootstrap").cli("models", "ensure")  # exports v0 into MODEL_CACHE when absent
    shutil.copytree(MODEL_CACHE / "v0", models / "v0")
    stack = LocalStack(workdir / "stack", model_dir=models, extra_env={
        "PRIVFACE_FEDERATED_SUPERLINK": f"127.0.0.1:{superlink_port}", "PRIVFACE_FEDERATED_SUPERLINK_INSECURE": "1",
        "PRIVFACE_FEDERATED_PYTHON": federated_python, "PRIVFACE_FEDERATED_STATE_DIR": str(workdir / "fed")})
    stack.cli("models", "ensure")  # registers the private copy of v0 in this gateway's database
    stack.start_process("gateway")
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(stack.url + "/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, stack.log("gateway")[-3000:]
            time.sleep(0.5)
        seconds["gateway_up"] = time.monotonic() - started
        headers = {"Authorization": f"Bearer {stack.api_key('admin')}"}
        httpx.post(stack.url + "/v1/admin/models/v0/activate", headers=headers, timeout=60).raise_for_status()
        mark = time.monotonic()
        cancelled = cancel_while_waiting(stack.url, headers)
        seconds["cancelled_job"], mark = time.monotonic() - mark, time.monotonic()
        created = httpx.post(stack.url + "/v1/admin/jobs", headers=headers, timeout=60,
                             json={"kind": "federated", "params": PARAMS})
        assert created.status_code == 202, created.text
        job_id, live, job = created.json()["id"], [], {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = httpx.get(f"{stack.url}/v1/admin/jobs/{job_id}", headers=headers, timeout=30).json()
            if job["status"] == "running" and (job["result"] or {}).get("rounds"):
                live.append({"message": job["message"], "rounds": job["result"]["rounds"]})
            if job["status"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(1.0)
        seconds["job"] = time.monotonic() - mark
        listed = httpx.get(stack.url + "/v1/admin/models", headers=headers, timeout=30).json()
        return {"job": job, "live": live, "cancelled": cancelled, "seconds": seconds, "models": listed, "model_dir": str(models),
                "gateway_log": stack.log("gateway")[-4000:]
                if job.get("status") != "succeeded" or cancelled["job"].get("status") != "cancelled" else ""}
    finally:
        stack.stop()


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
