"""Issue 9 (Medium): party traffic that does not depend on the match bit, and key rotation that erases.

Real processes (dealer, two parties, gateway with the real MPC engine), SQLite databases. Each party records
every call it receives (method, path, body size: ``secure/party/traffic.py``), which is what a party, the
dealer's view of the job sequence, or an observer of the links could use to learn an outcome.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path

import httpx
import pytest

from devtools.localstack import LocalStack
from tests.test_gateway_api import aligned_face, auth, new_subject, payload
from tests.test_gateway_recovery import FACES, served_spec
from tests.test_gateway_services import copy_models, wait_job

pytestmark = pytest.mark.slow
BACKGROUND = ("/healthz", "/internal/state")  # the gateway's periodic checks, unrelated to a request


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("traffic")
    models = copy_models(tmp)
    stack = LocalStack(tmp / "stack", model_dir=models)
    stack.cli("models", "ensure")
    stack.traffic = [tmp / f"party{rank}.traffic" for rank in (0, 1)]
    for name in ("dealer", "party0", "party1", "gateway"):
        extra = {"PRIVFACE_PARTY_TRAFFIC_LOG": str(stack.traffic[int(name[-1])])} if name.startswith("party") else {}
        stack.start_process(name, extra)
    try:
        stack.wait_ready(180)
        yield stack
    finally:
        stack.stop()


def _calls(path: Path) -> list[str]:
    lines = path.read_text().splitlines() if path.exists() else []
    return [line for line in lines if line.split()[1] not in BACKGROUND]


def recorded(stack: LocalStack, request) -> tuple[httpx.Response, list[list[str]]]:
    """Send one request; return its response and the calls each party received meanwhile."""
    before = [len(_calls(p)) for p in stack.traffic]
    response = request()
    return response, [_calls(p)[n:] for p, n in zip(stack.traffic, before)]


def template_seqs(stack: LocalStack, key: str, subject: str) -> list[int]:
    enrollments = httpx.get(f"{stack.url}/v1/subjects/{subject}", headers=auth(key)).json()["enrollments"]
    return [int(e["id"].removeprefix("enr_")) for e in enrollments]


def party_shares(stack: LocalStack, rank: int, seqs: list[int]) -> list[bytes | None]:
    with sqlite3.connect(stack.party_dbs[rank].removeprefix("sqlite:///")) as conn:
        marks = ",".join("?" * len(seqs))
        return [row[0] for row in conn.execute(f"SELECT share FROM shares WHERE template_seq IN ({marks})", seqs)]


def test_party_calls_do_not_depend_on_the_match(stack, shared):
    key = stack.api_key("admin", "enroll", "verify")
    spec = served_spec(stack, key)
    faces = [aligned_face(shared, name) for name in FACES[:2]] + [None]
    old = new_subject(stack, key, spec, faces[0])  # enrolled under v0 only
    created = httpx.post(stack.url + "/v1/admin/jobs", json={"kind": "register-model", "params": {"path": "v0b"}},
                         headers=auth(key))
    assert wait_job(stack, key, created.json()["id"])["status"] == "succeeded"
    assert httpx.post(stack.url + "/v1/admin/models/v0b/activate", headers=auth(key)).status_code == 200
    new = new_subject(stack, key, spec, faces[1])  # enrolled under v0b (active)

    def identify(face):
        return lambda: httpx.post(stack.url + "/v1/identify", json={"features": payload(spec, face)},
                                  headers=auth(key), timeout=60)

    def verify(subject, face):
        return lambda: httpx.post(stack.url + "/v1/verify", json={"subject_id": subject,
                                                                  "features": payload(spec, face)},
                                  headers=auth(key), timeout=60)

    # an impostor face: the first of the remaining faces that matches neither subject, under several noise draws
    # (each payload draws fresh noise, and the weak test model let one draw's stranger match the next time)
    candidates = [aligned_face(shared, name) for name in FACES[2:]]
    stranger = next((f for f in candidates if not any(identify(f)().json()["match"] for _ in range(3))
                     and not any(verify(old, f)().json()["match"] for _ in range(3))), None)
    assert stranger is not None, "no face in FACES[2:] is an impostor for both subjects"
    faces[2] = stranger

    # identify: no match / a match in the active gallery / a match in the earlier gallery -> the same calls
    none, calls_none = recorded(stack, identify(faces[2]))
    hit_new, calls_new = recorded(stack, identify(faces[1]))
    hit_old, calls_old = recorded(stack, identify(faces[0]))
    assert none.json()["match"] is False
    assert (hit_new.json()["subject_id"], hit_new.json()["model_version"]) == (new, "v0b")
    assert (hit_old.json()["subject_id"], hit_old.json()["model_version"]) == (old, "v0")
    assert calls_none[0] and [c for c in calls_none[0] if c.startswith("POST /internal/match ")]
    assert calls_none == calls_new == calls_old, (calls_none, calls_new, calls_old)

    # verify of a subject held only under the earlier model: impostor and genuine -> the same calls, no store
    impostor, calls_impostor = recorded(stack, verify(old, faces[2]))
    genuine, calls_genuine = recorded(stack, verify(old, faces[0]))
    assert (impostor.json()["match"], genuine.json()["match"]) == (False, True)
    assert genuine.json()["model_version"] == "v0"
    assert calls_impostor == calls_genuine, (calls_impostor, calls_genuine)
    assert not any("/internal/ops/" in c for c in calls_genuine[0] + calls_genuine[1])
    enrollments = httpx.get(f"{stack.url}/v1/subjects/{old}", headers=auth(key)).json()["enrollments"]
    assert [e["model_version"] for e in enrollments] == ["v0"]
    # moving to the new model is a re-enrollment
    again = httpx.post(f"{stack.url}/v1/subjects/{old}/enrollments", json={"features": payload(spec, faces[0])},
                       headers=auth(key), timeout=60)
    assert again.status_code == 201
    assert verify(old, faces[0])().json()["model_version"] == "v0b"


def test_rotate_key_erases_the_old_templates_at_both_parties(stack, shared):
    other = stack.api_key("enroll", "verify", tenant="other")
    key = stack.api_key("admin", "enroll", "verify", tenant="rotating")
    spec = served_spec(stack, key)
    faces = [aligned_face(shared, name) for name in FACES[3:5]]
    kept = new_subject(stack, other, spec, faces[0])
    subjects = [new_subject(stack, key, spec, face) for face in faces]
    seqs = [seq for s in subjects for seq in template_seqs(stack, key, s)]
    kept_seqs = template_seqs(stack, other, kept)
    assert len(seqs) == 2 and all(s is not None for r in (0, 1) for s in party_shares(stack, r, seqs))

    rotated = httpx.post(stack.url + "/v1/admin/tenant/rotate-key", headers=auth(key), timeout=60)
    assert rotated.status_code == 200, rotated.text
    for rank in (0, 1):  # erased at both parties; the other tenant's template untouched
        assert party_shares(stack, rank, seqs) == [None, None]
        assert all(s is not None for s in party_shares(stack, rank, kept_seqs))
        state = httpx.get(f"http://127.0.0.1:{stack.party_ports[rank]}/internal/state",
                          headers=auth(stack.tokens[rank])).json()
        assert state["pending"] == []
    assert rotated.json() == {"tenant_id": "rotating", "key_version": 2, "revoked_templates": 2}
    for subject in subjects:  # the revoked enrollments are no longer listed; the subjects remain
        assert httpx.get(f"{stack.url}/v1/subjects/{subject}", headers=auth(key)).json()["enrollments"] == []
    found = httpx.post(stack.url + "/v1/identify", json={"features": payload(spec, faces[0])}, headers=auth(key),
                       timeout=60).json()
    assert found["match"] is False
    # re-enrolment under the new key works and matches
    renewed = httpx.post(f"{stack.url}/v1/subjects/{subjects[0]}/enrollments",
                         json={"features": payload(spec, faces[0])}, headers=auth(key), timeout=60)
    assert renewed.status_code == 201
    assert httpx.post(stack.url + "/v1/verify", json={"subject_id": subjects[0], "features": payload(spec, faces[0])},
                      headers=auth(key), timeout=60).json()["match"] is True
