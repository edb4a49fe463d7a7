"""The `federated` job kind: strict params, the guardrail, subprocess failures, and its lifecycle on real workers.

The lifecycle tests share one stack (PostgreSQL + Redis + the LocalStack gateway) and start their own rq workers,
which run `training_jobs.federated.simulate` in .venv-federated: cancel, a worker killed mid-job, a run that cannot
start. A job through the API from start to publish, swap and verify: tests/test_federated_e2e.py.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from common.paths import PROJECT_ROOT as ROOT
from devtools.localstack import MODEL_CACHE, QUICK_EXPORT, LocalStack
from app.problems import Problem
from app.services.federated_deploy import deployment_command
from app.services.federated_job import (FederatedParams, FederatedRunError, command, guardrail, run_simulation,
                                        validate_params)
from app.settings import GatewaySettings
from tests.test_gateway_api import auth

FEDERATED_PYTHON = ROOT / ".venv-federated" / "bin" / "python"
# the suite runs in parallel workers beside Flower's processes: a gateway call may wait seconds for the CPU
http = httpx.Client(timeout=30.0)
TINY = {"rounds": 2, "clients": 3, "clients_per_round": 3, "pairs_per_fold": 4, "max_images": 2,
        "heldout_every_round": True}


@pytest.mark.parametrize("params, field", [
    ({"rounds": 0}, "rounds"), ({"rounds": 51}, "rounds"), ({"rounds": "3"}, "rounds"),
    ({"scope": "everything"}, "scope"), ({"mode": "semi-supervised"}, "mode"), ({"learning_rate": 1}, "learning_rate"),
    ({"clients": 3, "clients_per_round": 4}, "clients_per_round"), ({"lr": 0}, "lr"), ({"lr": 0.5}, "lr"),
    ({"lr": "5e-5"}, "lr"),
])
def test_federated_params_are_strict(params, field):
    with pytest.raises(Problem) as caught:
        validate_params(params)
    assert caught.value.status == 422 and caught.value.slug == "invalid-job-params"
    assert field in caught.value.detail


def test_federated_params_defaults():
    assert validate_params({"rounds": 2})["rounds"] == 2
    assert validate_params({})["scope"] == "whole" and validate_params({})["mode"] == "supervised"


def test_the_devices_learning_rate_reaches_the_run_only_when_set(tmp_path):
    """`lr` becomes simulate's --lr and --adapter-lr (a fifth, the default ratio); unset, neither is passed, so a
    job keeps the command (and the saved-state fingerprint) it had before the option existed."""
    settings = GatewaySettings(model_dir=tmp_path / "models")
    tuned = command(settings, FederatedParams.model_validate({"lr": 5e-5}), "fed-x", None, tmp_path / "state")
    assert tuned[tuned.index("--lr") + 1] == "5e-05" and float(tuned[tuned.index("--adapter-lr") + 1]) == 1e-5
    default = command(settings, FederatedParams(), "fed-x", None, tmp_path / "state")
    assert "--lr" not in default and "--adapter-lr" not in default


def test_the_calibration_settings_reach_both_engines_commands_and_too_few_images_are_refused(tmp_path):
    settings = GatewaySettings(federated_calibration_images=300, federated_superlink="127.0.0.1:9093",
                               federated_superlink_insecure=True)
    for cmd in (command(settings, FederatedParams(), "fed-x", None, tmp_path),
                deployment_command(settings, FederatedParams(engine="deployment"), "fed-x", None, tmp_path)):
        assert cmd[cmd.index("--calibration-images") + 1] == "300"
    default = command(GatewaySettings(), FederatedParams(), "fed-x", None, tmp_path)
    assert default[default.index("--calibration-images") + 1] == "1200"
    with pytest.raises(ValueError, match="federated_calibration_images"):
        GatewaySettings(federated_calibration_images=99)
    assert "--calibration-faces" not in default  # unset: a job's command (its resume fingerprint) as before
    unseen = GatewaySettings(federated_calibration_faces=tmp_path / "celeba-val", federated_superlink="127.0.0.1:9093",
                             federated_superlink_insecure=True)
    for cmd in (command(unseen, FederatedParams(), "fed-x", None, tmp_path),
                deployment_command(unseen, FederatedParams(engine="deployment"), "fed-x", None, tmp_path)):
        assert cmd[cmd.index("--calibration-faces") + 1] == str(tmp_path / "celeba-val")


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


def test_engine_deployment_refuses_options_its_app_does_not_run():
    for bad, named in (({"mixup": {"k": 2}}, "mixup"), ({"mode": "unsupervised"}, "unsupervised"),
                       ({"heldout_every_round": True}, "heldout_every_round"), ({"lr": 5e-5}, "lr")):
        with pytest.raises(Problem) as err:
            validate_params({"engine": "deployment", **bad})
        assert err.value.status == 422 and "engine deployment" in err.value.detail and named in err.value.detail
    assert validate_params({"engine": "deployment"})["engine"] == "deployment"
    assert validate_params({})["engine"] == "simulation"


def deployment_gateway(tmp_path, **settings):
    """A gateway app (no parties, no Redis) whose operator set `settings`; yields (client, admin key)."""
    from starlette.testclient import TestClient

    from app.auth import create_api_key, ensure_tenant
    from app.db import session_scope
    from app.main import create_app
    from app.settings import GatewaySettings

    app = create_app(GatewaySettings(env="test", database_url=f"sqlite:///{tmp_path / 'gateway.db'}",
                                     model_dir=tmp_path / "models", bundled_model_dir="", redis_url=None,
                                     party_urls="http://127.0.0.1:9,http://127.0.0.1:9", **settings))
    client = TestClient(app)
    client.__enter__()
    with session_scope(app.state.ctx.sessions) as session:
        ensure_tenant(session, "acme")
        key = create_api_key(session, "acme", ["admin"], app.state.ctx.settings.secret_key)
    return client, key


@pytest.mark.parametrize("settings, status, slug", [
    ({}, 409, "federated-superlink-not-configured"),
    ({"federated_superlink": "127.0.0.1:9093"}, 409, "federated-superlink-not-configured"),  # no TLS choice
    ({"federated_superlink": "127.0.0.1:{closed}", "federated_superlink_insecure": True}, 503,
     "federated-superlink-unreachable"),
])
def test_engine_deployment_without_a_reachable_superlink_is_refused_and_nothing_is_queued(tmp_path, settings,
                                                                                            status, slug):
    from devtools.net import free_port

    settings = {k: v.format(closed=free_port()) if isinstance(v, str) else v for k, v in settings.items()}
    client, key = deployment_gateway(tmp_path, **settings)
    try:
        answer = client.post("/v1/admin/jobs", headers=auth(key),
                             json={"kind": "federated", "params": {"engine": "deployment", "rounds": 1}})
        assert answer.status_code == status, answer.text
        assert answer.headers["content-type"].startswith("application/problem+json")
        assert answer.json()["type"].endswith("/" + slug) and "\n" not in answer.json()["detail"]
        assert client.get("/v1/admin/jobs", headers=auth(key)).json() == []
    finally:
        client.__exit__(None, None, None)


def private_models(tmp_path):
    LocalStack(tmp_path / "bootstrap").cli("models", "ensure")  # exports v0 into MODEL_CACHE when absent
    models = tmp_path / "models"
    shutil.copytree(MODEL_CACHE / "v0", models / "v0")
    return models


# --- lifecycle: cancel, a worker killed mid-job, orphan recovery, a failing run --------------------

LIFECYCLE = {"clients": 3, "clients_per_round": 2, "pairs_per_fold": 2, "max_images": 2}


@pytest.fixture(scope="module")
def lifecycle_stack(tmp_path_factory, shared, module_postgres_db, module_redis_url) -> Iterator[LocalStack]:
    """One gateway (PostgreSQL + Redis) for the three lifecycle tests (one start instead of three; each test starts
    its own workers and waits for its jobs to end): jobs have a 6 s lease (heartbeat every 2 s) and their state under
    `fed_dir`. No parties: a federated job and its model swap never reach them (a job through the whole stack, with
    verifies before and after the swap: tests/test_federated_e2e.py). Each test activates what it needs and compares
    the models with what it saw first, so their order is free."""
    root = tmp_path_factory.mktemp("lifecycle")
    stack = LocalStack(root / "stack", gateway_db=module_postgres_db(), redis_url=module_redis_url,
                       model_dir=private_models(root),
                       extra_env={"PRIVFACE_JOB_LEASE_S": "6", "PRIVFACE_FEDERATED_STATE_DIR": str(root / "fed"),
                                  "PRIVFACE_FEDERATED_TOLERANCE": "1.0", **QUICK_EXPORT})
    stack.cli("models", "ensure")
    stack.start_gateway_alone()
    yield stack
    stack.stop()


def fed_dir(stack: LocalStack) -> Path:
    """Where the stack's federated runs keep their state (one folder per job)."""
    return Path(stack.extra_env["PRIVFACE_FEDERATED_STATE_DIR"])


def wait_job(stack: LocalStack, key: str, job_id: str, done, timeout: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = http.get(f"{stack.url}/v1/admin/jobs/{job_id}", headers=auth(key)).json()
        if done(job):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.3)


def rounds_done(job: dict) -> int:
    rounds = (job.get("result") or {}).get("rounds") or []
    return max((r["round"] for r in rounds), default=-1)


def federated_processes(state_dir) -> list[str]:
    """Live simulate processes working on `state_dir` (ps, not zombies)."""
    out = subprocess.run(["ps", "-eo", "pid=,stat=,args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines()
            if str(state_dir) in line and "training_jobs.federated.simulate" in line and " Z" not in line[:12]]


@pytest.mark.slow
@pytest.mark.skipif(not FEDERATED_PYTHON.exists(), reason="no .venv-federated: run scripts/install_federated.sh")
def test_cancel_stops_a_running_federated_job_between_rounds_and_a_queued_one_at_once(lifecycle_stack):
    stack = lifecycle_stack
    stack.start_worker("worker-cancel")
    try:
        key = stack.api_key("admin")
        before = [m["version"] for m in http.get(stack.url + "/v1/admin/models", headers=auth(key)).json()]
        running = http.post(stack.url + "/v1/admin/jobs", headers=auth(key),
                             json={"kind": "federated", "params": {**LIFECYCLE, "rounds": 20}}).json()["id"]
        queued = http.post(stack.url + "/v1/admin/jobs", headers=auth(key),
                            json={"kind": "federated", "params": {**LIFECYCLE, "rounds": 2}}).json()["id"]
        wait_job(stack, key, running, lambda j: rounds_done(j) >= 1)

        # the second job waits behind the first (one worker): cancelled at once, it never starts
        out = http.post(f"{stack.url}/v1/admin/jobs/{queued}/cancel", headers=auth(key))
        assert out.status_code == 202 and out.json()["status"] == "cancelled", out.text
        out = http.post(f"{stack.url}/v1/admin/jobs/{running}/cancel", headers=auth(key))
        assert out.status_code == 202 and out.json()["status"] == "cancelling", out.text
        job = wait_job(stack, key, running, lambda j: j["status"] not in ("running", "cancelling"), timeout=120)
        assert job["status"] == "cancelled", job
        last = job["result"]["last_round"]
        assert 1 <= last < 20 and job["message"] == f"cancelled after round {last} of 20"
        assert [r["round"] for r in job["result"]["rounds"]] == list(range(last + 1))
        assert not (fed_dir(stack) / running).exists(), "the state of an ended job is removed"
        assert not federated_processes(fed_dir(stack) / running)

        models = http.get(stack.url + "/v1/admin/models", headers=auth(key)).json()
        assert [m["version"] for m in models] == before, "a cancelled run publishes nothing"
        time.sleep(3)  # the worker has taken the queued job's rq entry by now; it must not have run it
        job2 = http.get(f"{stack.url}/v1/admin/jobs/{queued}", headers=auth(key)).json()
        assert job2["status"] == "cancelled" and job2["message"] == "cancelled before it started" and not job2["result"]

        again = http.post(f"{stack.url}/v1/admin/jobs/{running}/cancel", headers=auth(key))
        assert again.status_code == 409 and again.json()["type"].endswith("/job-finished")
        assert http.get(f"{stack.url}/v1/admin/jobs/{running}", headers=auth(key)).json()["status"] == "cancelled"
        missing = http.post(f"{stack.url}/v1/admin/jobs/job_nope/cancel", headers=auth(key))
        assert missing.status_code == 404
    finally:
        stack.stop_process("worker-cancel")


@pytest.mark.slow
@pytest.mark.skipif(not FEDERATED_PYTHON.exists(), reason="no .venv-federated: run scripts/install_federated.sh")
def test_a_worker_killed_mid_job_is_replaced_and_the_job_resumes_from_its_last_round(lifecycle_stack):
    """Kill the real rq worker and its work-horse (SIGKILL, as a crashed machine would); the federated run dies
    with them; the job row is left `running`. A new worker finds its lease expired, requeues it, and the run
    resumes after its last saved round; the candidate is published as if nothing had happened."""
    stack = lifecycle_stack
    worker = stack.start_worker("worker-killed")
    try:
        key = stack.api_key("admin")
        http.post(stack.url + "/v1/admin/models/v0/activate", headers=auth(key)).raise_for_status()
        job_id = http.post(stack.url + "/v1/admin/jobs", headers=auth(key),
                            json={"kind": "federated", "params": {**LIFECYCLE, "rounds": 3}}).json()["id"]
        wait_job(stack, key, job_id, lambda j: rounds_done(j) >= 1)
        state_dir = fed_dir(stack) / job_id
        horses = subprocess.run(["pgrep", "-P", str(worker.pid)], capture_output=True, text=True).stdout.split()
        assert horses, "the worker runs the job in a forked work-horse"
        for pid in [worker.pid, *map(int, horses)]:
            os.kill(pid, signal.SIGKILL)
        worker.wait()
        deadline = time.monotonic() + 30
        while federated_processes(state_dir) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not federated_processes(state_dir), "the federated run must die with the worker"
        killed = http.get(f"{stack.url}/v1/admin/jobs/{job_id}", headers=auth(key)).json()
        assert killed["status"] == "running" and rounds_done(killed) < 3, killed  # killed with rounds to go
        assert (state_dir / "state.npz").exists()

        stack.start_worker("worker-replacement")
        job = wait_job(stack, key, job_id, lambda j: j["status"] in ("succeeded", "failed"), timeout=420)
        assert job["status"] == "succeeded", (job, stack.log("worker-replacement")[-3000:])
        result = job["result"]
        assert result["attempts"] == 2 and len(result["resumed"]) == 1, result
        assert 1 <= result["resumed"][0]["from_round"] < 3
        assert [r["round"] for r in result["rounds"]] == list(range(4))
        assert result["guardrail"]["decision"] == "activated" and result["status"] == "active"
        assert not state_dir.exists()
    finally:
        for name in ("worker-killed", "worker-replacement"):
            if name in stack.processes:
                stack.stop_process(name)


@pytest.mark.slow
@pytest.mark.skipif(not FEDERATED_PYTHON.exists(), reason="no .venv-federated: run scripts/install_federated.sh")
def test_a_gateway_running_the_job_in_process_is_killed_and_the_restarted_one_resumes_it(tmp_path):
    """Without Redis the gateway runs jobs itself (the embedded default of `make run`). SIGKILL it after round 1:
    the federated run dies with it (it watches its parent), the row stays `running`; the restarted gateway's
    recovery requeues the job once its lease has expired, and the run resumes after its last saved round."""
    state_root = tmp_path / "fed"
    stack = LocalStack(tmp_path / "stack", model_dir=private_models(tmp_path),  # SQLite, no Redis, no parties
                       extra_env={"PRIVFACE_JOB_LEASE_S": "6", "PRIVFACE_FEDERATED_STATE_DIR": str(state_root),
                                  "PRIVFACE_FEDERATED_TOLERANCE": "1.0", **QUICK_EXPORT})
    stack.cli("models", "ensure")
    try:
        stack.start_gateway_alone()
        key = stack.api_key("admin")
        assert http.get(stack.url + "/readyz").json()["checks"]["jobs"]["backend"] == "in-process"
        http.post(stack.url + "/v1/admin/models/v0/activate", headers=auth(key)).raise_for_status()
        job_id = http.post(stack.url + "/v1/admin/jobs", headers=auth(key),
                           json={"kind": "federated", "params": {**LIFECYCLE, "rounds": 2}}).json()["id"]
        wait_job(stack, key, job_id, lambda j: rounds_done(j) >= 1)
        stack.kill("gateway")
        deadline = time.monotonic() + 30
        while federated_processes(state_root / job_id) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not federated_processes(state_root / job_id), "the federated run must die with its gateway"
        assert (state_root / job_id / "state.npz").exists()

        stack.start_gateway_alone()
        job = wait_job(stack, key, job_id, lambda j: j["status"] in ("succeeded", "failed"), timeout=420)
        assert job["status"] == "succeeded", (job, stack.log("gateway")[-3000:])
        result = job["result"]
        assert result["attempts"] == 2 and len(result["resumed"]) == 1, result
        assert result["resumed"][0]["from_round"] in (1, 2)  # round 2 may have ended before the kill landed
        assert [r["round"] for r in result["rounds"]] == [0, 1, 2]
        assert result["guardrail"]["decision"] == "activated" and not (state_root / job_id).exists()
    finally:
        stack.stop()


@pytest.mark.slow
@pytest.mark.skipif(not FEDERATED_PYTHON.exists(), reason="no .venv-federated: run scripts/install_federated.sh")
def test_a_run_that_cannot_start_fails_with_one_clear_line_and_changes_nothing(lifecycle_stack):
    stack = lifecycle_stack
    stack.start_worker("worker-cannot-start")
    try:
        key = stack.api_key("admin")
        http.post(stack.url + "/v1/admin/models/v0/activate", headers=auth(key)).raise_for_status()
        bad = http.post(stack.url + "/v1/admin/jobs", headers=auth(key),
                         json={"kind": "federated", "params": {"aggregation": "secagg+", "clients_per_round": 1}})
        assert bad.status_code == 422 and "secagg+" in bad.json()["detail"]
        before = http.get(stack.url + "/v1/admin/models", headers=auth(key)).json()
        job_id = http.post(stack.url + "/v1/admin/jobs", headers=auth(key), json={"kind": "federated", "params": {
            "clients": 2000, "clients_per_round": 10, "pairs_per_fold": 2}}).json()["id"]
        job = wait_job(stack, key, job_id, lambda j: j["status"] in ("succeeded", "failed"), timeout=240)
        assert job["status"] == "failed" and "\n" not in job["message"], job
        assert job["message"].startswith("FederatedRunError: federated run exited with status 1: ValueError: only ")
        assert "training identities have >= 2 images" in job["message"]
        assert http.get(stack.url + "/v1/admin/models", headers=auth(key)).json() == before
        assert not (fed_dir(stack) / job_id).exists()
    finally:
        stack.stop_process("worker-cannot-start")


def test_orphaned_jobs_are_requeued_or_failed_once_their_lease_has_expired(postgres_db):
    """Real PostgreSQL: rows left `running` by a dead executor. The federated one is requeued (attempt 2), an
    export is failed with a clear reason, a job being cancelled ends cancelled, a fresh heartbeat is left alone,
    and a second recoverer racing the first acts on nothing."""
    from datetime import datetime, timedelta, timezone

    from app.db import make_engine, make_sessionmaker, session_scope
    from app.migrate import migrate_gateway
    from app.models import Job
    from app.services.jobs import MAX_ATTEMPTS, recover_orphaned_jobs
    from app.settings import GatewaySettings

    url = postgres_db()
    migrate_gateway(url)
    sessions = make_sessionmaker(make_engine(url))
    old = datetime.now(timezone.utc) - timedelta(seconds=30)
    rows = {"fed": ("federated", "running", old, {"rounds": [{"round": 1}]}),
            "fed-worn": ("federated", "running", old, {"attempt": MAX_ATTEMPTS}),
            "export": ("export-model-v0", "running", old, None),
            "stopping": ("federated", "cancelling", old, None),
            "alive": ("federated", "running", datetime.now(timezone.utc), None),
            "done": ("federated", "succeeded", old, {"version": "x"})}
    with session_scope(sessions) as session:
        for job_id, (kind, status, at, result) in rows.items():
            session.add(Job(id=job_id, kind=kind, params={}, status=status, result=result, created_at=at, updated_at=at))
    with session_scope(sessions) as session:  # the ORM's onupdate must not have refreshed them
        for job_id, (*_, at, _) in rows.items():
            session.execute(Job.__table__.update().where(Job.id == job_id).values(updated_at=at))
    settings = GatewaySettings(database_url=url, job_lease_s=10)
    requeued: list[tuple[str, int]] = []
    outcomes = dict(recover_orphaned_jobs(settings, sessions, lambda job_id, attempt: requeued.append((job_id, attempt))))
    assert outcomes == {"fed": "queued", "fed-worn": "failed", "export": "failed", "stopping": "cancelled"}
    assert requeued == [("fed", 2)]
    assert recover_orphaned_jobs(settings, sessions, lambda *a: requeued.append(a)) == []
    with session_scope(sessions) as session:
        got = {job.id: job for job in session.query(Job)}
        assert got["fed"].result == {"rounds": [{"round": 1}], "attempt": 2}
        assert "resuming where it stopped (attempt 2 of 3)" in got["fed"].message
        assert got["export"].message.startswith("WorkerLost: the worker running it stopped (no heartbeat for 10 s)")
        assert "cannot resume" in got["export"].message
        assert got["alive"].status == "running" and got["done"].status == "succeeded"
