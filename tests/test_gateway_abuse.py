"""Abuse controls end to end: the real gateway process (Redis, real MPC parties), real faces.

Replay (the same bytes are accepted at most once, ever), per-key budgets with 429 + Retry-After, the
verify lock-out of a subject (423, audited, lifted by an admin or a match), and no secret from a query
string in the gateway's log. Settings are small so that windows pass within a test.
"""
from __future__ import annotations

import sqlite3
import time

import httpx
import pytest
import redis

from devtools.localstack import LocalStack
from tests.test_gateway_api import aligned_face, assert_problem, auth, new_subject, payload
from tests.test_gateway_recovery import FACES, served_spec

pytestmark = pytest.mark.slow

REPLAY_WINDOW_S, CLOCK_SKEW_S = 3, 1
NONCE_TTL_S = REPLAY_WINDOW_S + CLOCK_SKEW_S + 1
RATE_WINDOW_S = 30  # long enough that two MPC identify jobs on a loaded 2-core CI machine fit in one window
SETTINGS = {
    "PRIVFACE_REPLAY_WINDOW_S": str(REPLAY_WINDOW_S), "PRIVFACE_CLOCK_SKEW_S": str(CLOCK_SKEW_S),
    "PRIVFACE_NONCE_TTL_S": "3",  # what the previous code read as its only replay setting (ignored now)
    "PRIVFACE_RATE_WINDOW_S": str(RATE_WINDOW_S), "PRIVFACE_RATE_IDENTIFY_PER_KEY": "2",
    "PRIVFACE_RATE_ENROLL_PER_KEY": "2", "PRIVFACE_LOCKOUT_FAILURES": "2", "PRIVFACE_LOCKOUT_S": "300",
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, shared):
    url = "redis://127.0.0.1:6379/15"
    redis.Redis.from_url(url).flushdb()
    stack = LocalStack(tmp_path_factory.mktemp("abuse-stack"), redis_url=url, extra_env=SETTINGS).start()
    yield stack
    stack.stop()
    redis.Redis.from_url(url).flushdb()


@pytest.fixture(scope="module")
def spec(stack):
    return served_spec(stack, stack.api_key("verify", tenant="spec-reader"))


def rows(stack: LocalStack, query: str) -> list[tuple]:
    with sqlite3.connect(stack.gateway_db.removeprefix("sqlite:///")) as conn:
        return conn.execute(query).fetchall()


def state(stack: LocalStack) -> dict:
    """Everything a request could change: gateway tables and the parties' shares."""
    counts = {t: rows(stack, f"SELECT COUNT(*) FROM {t}")[0][0] for t in ("subjects", "enrollments", "operations",
                                                                          "audit_log")}
    for rank in (0, 1):
        with sqlite3.connect(stack.party_dbs[rank].removeprefix("sqlite:///")) as conn:
            counts[f"party{rank}_shares"] = conn.execute("SELECT COUNT(*) FROM shares").fetchone()[0]
    return counts


def nonce_seen(stack: LocalStack, body: dict) -> bool:
    return bool(redis.Redis.from_url(stack.redis_url).exists(f"privface:nonce:{body['nonce']}"))


def test_the_same_payload_is_accepted_at_most_once_ever(stack, spec, shared):
    key = stack.api_key("enroll", "verify", tenant="replay")
    subject = new_subject(stack, key, spec, aligned_face(shared, FACES[0]))
    outcomes = {}
    for name in ("unstamped", "stamped"):
        features = payload(spec, aligned_face(shared, FACES[0]))  # stamped now: the window is short
        if name == "unstamped":
            unstamped = features
            del features["created_at"]
        body = {"subject_id": subject, "features": features}
        first = httpx.post(stack.url + "/v1/verify", json=body, headers=auth(key), timeout=60)
        time.sleep(NONCE_TTL_S + 0.5)  # the nonce has expired by now
        again = httpx.post(stack.url + "/v1/verify", json=body, headers=auth(key), timeout=60)
        outcomes[name] = (first.status_code, again.status_code)
        assert not (first.status_code == 200 and again.status_code == 200), f"{name} payload accepted twice"
    assert_problem(httpx.post(stack.url + "/v1/verify", json={"subject_id": subject, "features": unstamped},
                              headers=auth(key)), 422, "validation-error")
    assert outcomes == {"unstamped": (422, 422), "stamped": (200, 422)}


def test_key_budget_429_with_retry_after_changes_nothing_then_the_window_passes(stack, spec, shared):
    key = stack.api_key("enroll", "verify", tenant="budget")
    face = aligned_face(shared, FACES[1])
    subject = httpx.post(stack.url + "/v1/subjects", json={}, headers=auth(key)).json()["id"]
    started = time.monotonic()
    for _ in range(2):
        response = httpx.post(f"{stack.url}/v1/subjects/{subject}/enrollments",
                              json={"features": payload(spec, face)}, headers=auth(key), timeout=60)
        assert response.status_code == 201, response.text
    before = state(stack)
    refused_body = {"features": payload(spec, face)}
    refused = httpx.post(f"{stack.url}/v1/subjects/{subject}/enrollments", json=refused_body, headers=auth(key))
    assert_problem(refused, 429, "rate-limited")
    retry_after = int(refused.headers["Retry-After"])
    assert 1 <= retry_after <= RATE_WINDOW_S
    assert state(stack) == before and not nonce_seen(stack, refused_body["features"])
    other_key = stack.api_key("enroll", tenant="budget")  # each key has its own budget
    assert httpx.post(f"{stack.url}/v1/subjects/{subject}/enrollments", json={"features": payload(spec, face)},
                      headers=auth(other_key), timeout=60).status_code == 201
    time.sleep(max(retry_after, RATE_WINDOW_S - (time.monotonic() - started)) + 0.2)
    allowed = httpx.post(f"{stack.url}/v1/subjects/{subject}/enrollments", json={"features": payload(spec, face)},
                         headers=auth(key), timeout=60)
    assert allowed.status_code == 201, allowed.text


def test_identify_budget_per_key(stack, spec, shared):
    key = stack.api_key("verify", tenant="budget")
    bodies = [{"features": payload(spec, aligned_face(shared, FACES[2]))} for _ in range(3)]
    for body in bodies[:2]:
        assert httpx.post(stack.url + "/v1/identify", json=body, headers=auth(key), timeout=60).status_code == 200
    before = state(stack)
    refused = httpx.post(stack.url + "/v1/identify", json=bodies[2], headers=auth(key), timeout=60)
    assert_problem(refused, 429, "rate-limited")
    assert int(refused.headers["Retry-After"]) >= 1
    assert state(stack) == before and not nonce_seen(stack, bodies[2]["features"])


def test_subject_locked_after_consecutive_failed_verifies_audited_and_unlocked(stack, spec, shared):
    key = stack.api_key("enroll", "verify", "admin", tenant="lockout")
    genuine, impostor = aligned_face(shared, FACES[3]), aligned_face(shared, FACES[4])
    subject = new_subject(stack, key, spec, genuine)

    def verify(face) -> httpx.Response:
        return httpx.post(stack.url + "/v1/verify", json={"subject_id": subject, "features": payload(spec, face)},
                          headers=auth(key), timeout=60)

    assert verify(impostor).json()["match"] is False
    assert verify(genuine).json()["match"] is True  # a match resets the count
    assert verify(impostor).json()["match"] is False
    assert verify(impostor).json()["match"] is False  # second failure in a row: locked
    audit = rows(stack, f"SELECT action, outcome FROM audit_log WHERE subject_id = '{subject}' ORDER BY id")
    assert audit[-1] == ("verify-lockout", "locked") and audit.count(("verify-lockout", "locked")) == 1

    before = state(stack)
    body = {"subject_id": subject, "features": payload(spec, genuine)}
    locked = httpx.post(stack.url + "/v1/verify", json=body, headers=auth(key), timeout=60)
    assert_problem(locked, 423, "subject-locked")
    assert 1 <= int(locked.headers["Retry-After"]) <= 300
    assert state(stack) == before and not nonce_seen(stack, body["features"])

    assert httpx.post(f"{stack.url}/v1/admin/subjects/{subject}/unlock", headers=auth(stack.api_key(
        "admin", tenant="other"))).status_code == 404  # another tenant's admin cannot see it
    unlocked = httpx.post(f"{stack.url}/v1/admin/subjects/{subject}/unlock", headers=auth(key))
    assert unlocked.status_code == 200 and unlocked.json() == {"subject_id": subject, "was_locked": True}
    assert rows(stack, f"SELECT action, outcome FROM audit_log WHERE subject_id = '{subject}' "
                       "ORDER BY id DESC LIMIT 1") == [("unlock-subject", "unlocked")]
    assert verify(genuine).json()["match"] is True


def test_api_key_in_a_query_string_never_reaches_the_log(stack):
    secret = "pf_0123456789ab_QUERYSECRETqueryvalue42"
    refused = httpx.get(f"{stack.url}/v1/transforms?api_key={secret}")
    assert_problem(refused, 401, "unauthorized")
    httpx.get(f"{stack.url}/v1/transforms?page=1&token=ANOTHERSECRET1")
    deadline = time.monotonic() + 10
    while "token=[REDACTED]" not in stack.log("gateway") and time.monotonic() < deadline:
        time.sleep(0.2)
    log = stack.log("gateway")
    assert "/v1/transforms?api_key=[REDACTED]" in log  # the access line is there, without its secret
    assert "QUERYSECRET" not in log and "ANOTHERSECRET1" not in log
