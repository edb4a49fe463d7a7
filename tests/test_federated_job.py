"""The `federated` job kind: strict params, the guardrail, subprocess failures, and one real run through the API.

The real run: PostgreSQL + Redis + an rq worker + the LocalStack gateway; the worker starts
`training_jobs.federated.simulate` in .venv-federated (2 rounds, 3 clients, a few held-out pairs), the API shows
its rounds while it runs, the candidate is exported into the gateway's model directory, registered, and the
guardrail's decision is in the result.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import time

import httpx
import pytest

from common.paths import PROJECT_ROOT as ROOT
from devtools.localstack import MODEL_CACHE, LocalStack
from app.problems import Problem
from app.services.federated_job import FederatedRunError, guardrail, run_simulation, validate_params
from tests.test_gateway_api import auth

FEDERATED_PYTHON = ROOT / ".venv-federated" / "bin" / "python"
TINY = {"rounds": 2, "clients": 3, "clients_per_round": 3, "pairs_per_fold": 4, "max_images": 2,
        "heldout_every_round": True}


@pytest.mark.parametrize("params, field", [
    ({"rounds": 0}, "rounds"), ({"rounds": 51}, "rounds"), ({"rounds": "3"}, "rounds"),
    ({"scope": "everything"}, "scope"), ({"mode": "unsupervised"}, "mode"), ({"learning_rate": 1}, "learning_rate"),
    ({"clients": 3, "clients_per_round": 4}, "clients_per_round"),
])
def test_federated_params_are_strict(params, field):
    with pytest.raises(Problem) as caught:
        validate_params(params)
    assert caught.value.status == 422 and caught.value.slug == "invalid-job-params"
    assert field in caught.value.detail


def test_federated_params_defaults():
    assert validate_params({"rounds": 2})["rounds"] == 2
    assert validate_params({})["scope"] == "whole" and validate_params({})["mode"] == "supervised"


def test_guardrail_refuses_a_worse_candidate_and_accepts_one_within_tolerance():
    assert not guardrail(0.80, 0.84, 0.005).activate
    assert "below the active version" in guardrail(0.80, 0.84, 0.005).reason
    assert guardrail(0.836, 0.84, 0.005).activate
    assert guardrail(0.90, 0.84, 0.005).to_dict()["decision"] == "activated"
    assert guardrail(0.90, None, 0.005).to_dict()["decision"] == "kept-candidate"  # nothing to compare with
    assert not guardrail(None, 0.84, 0.005).activate


def test_a_failing_run_ends_with_one_clear_line():
    """The gateway's venv has no flwr: the real simulate module fails there, and the error is one line."""
    with pytest.raises(FederatedRunError) as caught:
        run_simulation([sys.executable, "-m", "training_jobs.federated.simulate", "--rounds", "1"],
                       {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, lambda event: None)
    message = str(caught.value)
    assert "\n" not in message and "status 1" in message and "No module named 'flwr'" in message, message


def test_progress_events_are_read_and_other_output_ignored():
    script = ("import json;print('ray says hi');"
              "print(json.dumps({'event':'round','round':1,'of':1,'sampled':2,'finished':2,'failed':0}));"
              "print(json.dumps({'event':'result','exported':'x'}))")
    events: list[dict] = []
    result = run_simulation([sys.executable, "-c", script], {"PATH": "/usr/bin:/bin"}, events.append)
    assert [e["round"] for e in events] == [1] and result["exported"] == "x"


def private_models(tmp_path):
    LocalStack(tmp_path / "bootstrap").cli("models", "ensure")  # exports v0 into MODEL_CACHE when absent
    models = tmp_path / "models"
    shutil.copytree(MODEL_CACHE / "v0", models / "v0")
    return models


@pytest.mark.slow
@pytest.mark.skipif(not FEDERATED_PYTHON.exists(), reason="no .venv-federated: run scripts/install_federated.sh")
def test_federated_job_through_the_api_publishes_a_candidate(tmp_path, shared, postgres_db, redis_url):
    stack = LocalStack(tmp_path / "stack", gateway_db=postgres_db(), party_dbs=(postgres_db(), postgres_db()),
                       redis_url=redis_url, model_dir=private_models(tmp_path),
                       extra_env={"PRIVFACE_FEDERATED_TOLERANCE": "1.0"}).start()
    worker = subprocess.Popen([sys.executable, "-m", "privface", "worker"], cwd=ROOT, env=stack.env(),
                              stdout=open(tmp_path / "worker.log", "wb"), stderr=subprocess.STDOUT)
    try:
        key = stack.api_key("admin")
        httpx.post(stack.url + "/v1/admin/models/v0/activate", headers=auth(key)).raise_for_status()
        bad = httpx.post(stack.url + "/v1/admin/jobs", json={"kind": "federated", "params": {**TINY, "rounds": 99}},
                         headers=auth(key))
        assert bad.status_code == 422 and bad.headers["content-type"].startswith("application/problem+json")
        assert bad.json()["type"].endswith("/invalid-job-params") and "rounds" in bad.json()["detail"]

        created = httpx.post(stack.url + "/v1/admin/jobs", json={"kind": "federated", "params": TINY},
                             headers=auth(key))
        assert created.status_code == 202, created.text
        job_id, seen_live, job = created.json()["id"], [], {}
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            job = httpx.get(f"{stack.url}/v1/admin/jobs/{job_id}", headers=auth(key)).json()
            if job["status"] == "running" and (job["result"] or {}).get("rounds"):
                seen_live.append((job["progress"], job["message"], len(job["result"]["rounds"])))
            if job["status"] in ("succeeded", "failed"):
                break
            time.sleep(0.5)
        assert job["status"] == "succeeded", (job, (tmp_path / "worker.log").read_text()[-3000:])
        assert seen_live and any("round" in message for _, message, _ in seen_live), seen_live
        result = job["result"]
        assert [r["round"] for r in result["rounds"]] == [0, 1, 2]
        assert all(r["sampled"] == 3 and r["finished"] == 3 and r["failed"] == 0 for r in result["rounds"][1:])
        assert all(r["heldout"]["num_pairs"] == 20 for r in result["rounds"])
        assert result["heldout"]["active_version"]["version"] == "v0"
        # tolerance 1.0: any candidate passes the guardrail, so it is activated and served
        assert result["guardrail"]["decision"] == "activated", result["guardrail"]
        assert result["status"] == "active" and result["active_before"] == "v0"
        models = {m["version"]: m for m in httpx.get(stack.url + "/v1/admin/models", headers=auth(key)).json()}
        assert models[result["version"]]["status"] == "active" and models["v0"]["status"] == "retired"
        assert "federated" in models[result["version"]]["metrics"]
        assert (stack.model_dir / result["version"] / "model.onnx").is_file()
        deadline = time.monotonic() + 15
        while httpx.get(stack.url + "/readyz").json()["checks"]["model"]["version"] != result["version"]:
            assert time.monotonic() < deadline, "the gateway did not swap to the federated candidate"
            time.sleep(0.5)
    finally:
        worker.terminate()
        worker.wait(timeout=15)
        stack.stop()
