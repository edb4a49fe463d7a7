"""The stack on PostgreSQL + Redis: rq jobs with progress, and live model activation across workers."""
from __future__ import annotations

import json
import shutil
import threading
import time

import httpx
import psycopg
import pytest

from devtools.localstack import MODEL_CACHE, LocalStack
from tests.test_gateway_api import aligned_face, auth, payload
from tests.test_gateway_recovery import FACES, served_spec

pytestmark = pytest.mark.slow


def copy_models(tmp_path, stack_cls=LocalStack):
    """A private model directory holding v0 (exported once per machine) and an identical 'v0b'."""
    LocalStack(tmp_path / "bootstrap").cli("models", "ensure")  # exports into MODEL_CACHE when absent
    models = tmp_path / "models"
    shutil.copytree(MODEL_CACHE / "v0", models / "v0")
    shutil.copytree(MODEL_CACHE / "v0", models / "v0b")
    meta = json.loads((models / "v0b" / "model.json").read_text())
    meta["version"] = "v0b"
    (models / "v0b" / "model.json").write_text(json.dumps(meta))
    return models


def pg_rows(url: str, query: str) -> list[tuple]:
    with psycopg.connect(url.replace("postgresql+psycopg", "postgresql")) as conn:
        return conn.execute(query).fetchall()


def wait_job(stack: LocalStack, key: str, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{stack.url}/v1/admin/jobs/{job_id}", headers=auth(key)).json()
        if job["status"] in ("succeeded", "failed"):
            return job
        time.sleep(0.3)
    raise TimeoutError(job)


def test_postgresql_redis_rq_jobs_and_live_model_swap(tmp_path, shared, postgres_db, redis_url):
    models = copy_models(tmp_path)
    stack = LocalStack(tmp_path / "stack", gateway_db=postgres_db(), party_dbs=(postgres_db(), postgres_db()),
                       redis_url=redis_url, model_dir=models, gateway_workers=2).start()
    stack.start_worker()  # ended by stack.stop(): SIGTERM, then SIGKILL after 15 s, its work-horse with it
    try:
        key = stack.api_key("enroll", "verify", "admin")
        spec = served_spec(stack, key)
        # enroll / verify / identify / delete with every database on PostgreSQL
        subject = httpx.post(stack.url + "/v1/subjects", json={}, headers=auth(key)).json()["id"]
        face = aligned_face(shared, FACES[0])
        enrolled = httpx.post(f"{stack.url}/v1/subjects/{subject}/enrollments",
                              json={"features": payload(spec, face)}, headers=auth(key), timeout=60)
        assert enrolled.status_code == 201, enrolled.text
        verify = httpx.post(stack.url + "/v1/verify", json={"subject_id": subject, "features": payload(spec, face)},
                            headers=auth(key), timeout=60)
        assert verify.json()["match"] is True
        assert pg_rows(stack.gateway_db, "SELECT COUNT(*) FROM enrollments") == [(1,)]
        assert pg_rows(stack.party_dbs[0], "SELECT COUNT(*) FROM shares") == [(1,)]
        assert httpx.delete(f"{stack.url}/v1/subjects/{subject}", headers=auth(key), timeout=60).status_code == 204
        assert pg_rows(stack.gateway_db, "SELECT COUNT(*) FROM enrollments") == [(0,)]
        for rank in (0, 1):
            assert pg_rows(stack.party_dbs[rank], "SELECT COUNT(*) FROM shares WHERE share IS NOT NULL") == [(0,)]

        # a background job through Redis and the rq worker, with progress in the API
        created = httpx.post(stack.url + "/v1/admin/jobs", json={"kind": "register-model", "params": {"path": "v0b"}},
                             headers=auth(key))
        assert created.status_code == 202 and created.json()["status"] == "queued"
        job = wait_job(stack, key, created.json()["id"])
        assert job["status"] == "succeeded" and job["progress"] == 1.0, job
        assert job["result"]["version"] == "v0b" and job["result"]["status"] == "candidate"
        bad = httpx.post(stack.url + "/v1/admin/jobs", json={"kind": "register-model", "params": {"path": "../x"}},
                         headers=auth(key))
        failed = wait_job(stack, key, bad.json()["id"])
        assert failed["status"] == "failed" and "inside the model directory" in failed["message"]

        # activation: both gateway workers swap sessions while requests keep flowing
        statuses: list[int] = []
        stop = threading.Event()

        def traffic() -> None:
            while not stop.is_set():
                response = httpx.post(stack.url + "/v1/identify", json={"features": payload(spec, face)},
                                      headers=auth(key), timeout=60)
                statuses.append(response.status_code)

        thread = threading.Thread(target=traffic)
        thread.start()
        time.sleep(1.0)
        activated = httpx.post(stack.url + "/v1/admin/models/v0b/activate", headers=auth(key))
        assert activated.status_code == 200 and activated.json()["status"] == "active"
        deadline = time.monotonic() + 10
        seen: set[str] = set()
        while time.monotonic() < deadline:
            seen = {httpx.get(stack.url + "/readyz").json()["checks"]["model"]["version"] for _ in range(20)}
            if seen == {"v0b"}:
                break
        time.sleep(1.0)
        stop.set()
        thread.join(timeout=60)
        assert seen == {"v0b"}, seen
        assert statuses and set(statuses) == {200}, statuses
        listed = httpx.get(stack.url + "/v1/admin/models", headers=auth(key)).json()
        assert {m["version"]: m["status"] for m in listed} == {"v0": "retired", "v0b": "active"}
    finally:
        stack.stop()


def test_jobs_in_process_and_reenrollment_under_a_new_model(tmp_path, shared):
    models = copy_models(tmp_path)
    stack = LocalStack(tmp_path / "stack", model_dir=models).start()
    try:
        key = stack.api_key("admin", "enroll", "verify")
        spec = served_spec(stack, key)
        face, other = aligned_face(shared, FACES[0]), aligned_face(shared, FACES[1])
        subject = httpx.post(stack.url + "/v1/subjects", json={}, headers=auth(key)).json()["id"]
        assert httpx.post(f"{stack.url}/v1/subjects/{subject}/enrollments", json={"features": payload(spec, face)},
                          headers=auth(key), timeout=60).status_code == 201
        ready = httpx.get(stack.url + "/readyz").json()
        assert ready["checks"]["jobs"]["backend"] == "in-process"
        created = httpx.post(stack.url + "/v1/admin/jobs", json={"kind": "register-model", "params": {"path": "v0b"}},
                             headers=auth(key))
        assert wait_job(stack, key, created.json()["id"])["status"] == "succeeded"
        unknown = httpx.post(stack.url + "/v1/admin/jobs", json={"kind": "nope"}, headers=auth(key))
        assert unknown.status_code == 422 and unknown.json()["type"].endswith("/unknown-job-kind")
        missing = httpx.post(stack.url + "/v1/admin/models/v9/activate", headers=auth(key))
        assert missing.status_code == 404 and missing.json()["type"].endswith("/model-not-found")

        # v0b takes over: old templates still match (v0 gallery); a match does not migrate (that would tell the
        # parties the bit, docs/security.md): the subject moves to v0b by re-enrollment
        assert httpx.post(stack.url + "/v1/admin/models/v0b/activate", headers=auth(key)).status_code == 200
        found = httpx.post(stack.url + "/v1/identify", json={"features": payload(spec, face)}, headers=auth(key),
                           timeout=60).json()
        assert found["match"] is True and found["subject_id"] == subject and found["model_version"] == "v0"
        impostor = httpx.post(stack.url + "/v1/verify", json={"subject_id": subject, "features": payload(spec, other)},
                              headers=auth(key), timeout=60).json()
        assert impostor["match"] is False and impostor["model_version"] == "v0"
        genuine = httpx.post(stack.url + "/v1/verify", json={"subject_id": subject, "features": payload(spec, face)},
                             headers=auth(key), timeout=60).json()
        assert genuine["match"] is True and genuine["model_version"] == "v0"
        assert len(httpx.get(f"{stack.url}/v1/subjects/{subject}", headers=auth(key)).json()["enrollments"]) == 1
        assert httpx.post(f"{stack.url}/v1/subjects/{subject}/enrollments", json={"features": payload(spec, face)},
                          headers=auth(key), timeout=60).status_code == 201
        enrollments = httpx.get(f"{stack.url}/v1/subjects/{subject}", headers=auth(key)).json()["enrollments"]
        assert sorted(e["model_version"] for e in enrollments) == ["v0", "v0b"]
        again = httpx.post(stack.url + "/v1/verify", json={"subject_id": subject, "features": payload(spec, face)},
                           headers=auth(key), timeout=60).json()
        assert again["match"] is True and again["model_version"] == "v0b"
        found = httpx.post(stack.url + "/v1/identify", json={"features": payload(spec, face)}, headers=auth(key),
                           timeout=60).json()
        assert found["subject_id"] == subject and found["model_version"] == "v0b"
    finally:
        stack.stop()


def test_operations_hold_gallery_names_of_the_longest_tenant_ids_in_postgresql(postgres_url: str) -> None:
    """Regression (issue 14): the gallery name {version}/{tenant}/k{n} reached ~135 characters with a 64-character
    tenant id, and operations.model_version was VARCHAR(64): PostgreSQL refused the enrollment."""
    from app.db import make_engine, make_sessionmaker, session_scope
    from app.migrate import migrate_gateway
    from app.models import Operation
    from app.services.templates import gallery_name

    migrate_gateway(postgres_url)
    gallery = gallery_name("v" * 64, "t" * 64, 12345)
    assert len(gallery) > 64
    with session_scope(make_sessionmaker(make_engine(postgres_url))) as session:
        session.add(Operation(kind="store", model_version=gallery, template_seqs=[1], context={}))
    with session_scope(make_sessionmaker(make_engine(postgres_url))) as session:
        assert session.query(Operation).one().model_version == gallery
