"""Replay, budgets, lock-out and log redaction, on the real backends: Redis, SQLite, PostgreSQL, in-process.

The end-to-end versions (real gateway process, real MPC) are in tests/test_gateway_abuse.py.
"""
from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timedelta, timezone

import pydantic
import pytest
import redis
from sqlalchemy.orm import sessionmaker

from app.auth import Principal
from app.db import make_engine, make_sessionmaker
from app.logredact import RedactSecrets, log_config, redact
from app.migrate import migrate_gateway
from app.problems import Problem
from app.schemas import FeaturePayload
from app.services.abuse import AbuseControls
from app.services.counters import Budget, MemoryCounters, RedisCounters
from app.services.replay import ReplayGuard
from app.settings import GatewaySettings
from inference.transform import default_spec

ACME = Principal("acme", "0123456789ab", frozenset({"verify"}), 1, None)
ACME_OTHER_KEY = Principal("acme", "ba9876543210", frozenset({"verify"}), 1, None)
GLOBEX = Principal("globex", "aaaaaaaaaaaa", frozenset({"verify"}), 1, None)


def payload_body(**override) -> dict:
    spec = default_spec()
    body = {"transform_id": spec.transform_id, "params_hash": spec.params_hash, "shape": list(spec.shape),
            "dtype": "float16", "data": "", "epsilon": spec.epsilon_per_image, "nonce": "cd" * 16,
            "created_at": datetime.now(timezone.utc).isoformat()}
    body.update(override)
    return body


# --- replay ----------------------------------------------------------------------------------------------

def test_payload_without_created_at_is_refused_by_the_schema():
    body = payload_body()
    del body["created_at"]
    with pytest.raises(pydantic.ValidationError, match="created_at"):
        FeaturePayload(**body)
    with pytest.raises(pydantic.ValidationError, match="created_at"):
        FeaturePayload(**payload_body(created_at=None))


def test_nonce_ttl_is_bound_to_the_freshness_window():
    settings = GatewaySettings(replay_window_s=30, clock_skew_s=7)
    assert settings.nonce_ttl_s >= settings.replay_window_s + settings.clock_skew_s
    with pytest.raises(ValueError, match="shorter than the freshness window"):
        ReplayGuard(sessionmaker(), window_s=30, skew_s=7, nonce_ttl_s=36, redis_client=None)


@pytest.fixture(params=["redis", "sqlite", "postgresql"])
def replay_guard(request, tmp_path, postgres_db, redis_url):
    """A guard with a 1 s window and 1 s skew (nonce TTL 3 s) on each real backend."""
    settings = GatewaySettings(replay_window_s=1, clock_skew_s=1)
    client = redis.Redis.from_url(redis_url) if request.param == "redis" else None
    url = postgres_db() if request.param == "postgresql" else f"sqlite:///{tmp_path / 'gw.db'}"
    migrate_gateway(url)
    engine = make_engine(url)
    yield ReplayGuard(make_sessionmaker(engine), settings.replay_window_s, settings.clock_skew_s,
                      settings.nonce_ttl_s, client)
    engine.dispose()
    if client is not None:
        client.close()


def test_same_payload_is_never_accepted_twice_even_after_the_nonce_ttl(replay_guard):
    """Stamped as far ahead as the skew allows (the worst case), then resent until long after the TTL."""
    ahead = datetime.now(timezone.utc) + timedelta(seconds=replay_guard.skew_s) - timedelta(milliseconds=200)
    payload = FeaturePayload(**payload_body(created_at=ahead.isoformat()))
    replay_guard.admit(payload)
    deadline = time.monotonic() + replay_guard.nonce_ttl_s + 1.5
    refusals = set()
    while time.monotonic() < deadline:
        with pytest.raises(Problem) as refused:
            replay_guard.admit(payload)
        refusals.add(refused.value.slug)
        time.sleep(0.25)
    assert refusals == {"replayed-nonce", "stale-payload"}  # first the nonce refuses it, then its age


def test_fresh_payloads_with_new_nonces_pass(replay_guard):
    for nonce in ("ab" * 16, "ef" * 16):
        replay_guard.admit(FeaturePayload(**payload_body(nonce=nonce)))


# --- budgets and lock-out --------------------------------------------------------------------------------

@pytest.fixture(params=["redis", "in-process"])
def counters(request, redis_url):
    if request.param == "in-process":
        yield MemoryCounters()
        return
    client = redis.Redis.from_url(redis_url)
    yield RedisCounters(client)
    client.close()


def controls(counters, **settings) -> AbuseControls:
    defaults = dict(rate_window_s=1, rate_verify_per_key=100, rate_identify_per_key=3, rate_enroll_per_key=2,
                    subject_verify_limit=100, subject_verify_window_s=60, lockout_failures=3,
                    lockout_window_s=60, lockout_s=60)
    return AbuseControls(counters, GatewaySettings(**{**defaults, **settings}))


def refusal(call, status: int, slug: str) -> Problem:
    with pytest.raises(Problem) as refused:
        call()
    assert (refused.value.status, refused.value.slug) == (status, slug), refused.value
    return refused.value


def test_key_budget_exhausted_gives_429_with_retry_after_then_the_window_passes(counters):
    abuse = controls(counters)
    for _ in range(3):
        abuse.admit(ACME, "identify")
    problem = refusal(lambda: abuse.admit(ACME, "identify"), 429, "rate-limited")
    assert problem.headers["Retry-After"] == "1"
    abuse.admit(ACME_OTHER_KEY, "identify")  # another key has its own budget
    abuse.admit(ACME, "enroll")  # and another route class too
    time.sleep(1.1)
    abuse.admit(ACME, "identify")


def test_refused_request_spends_no_budget(counters):
    """Per-key and per-subject budgets are spent together or not at all."""
    abuse = controls(counters, rate_window_s=60, rate_verify_per_key=2, subject_verify_limit=1)
    abuse.admit_verify(ACME, "sub_a")
    refusal(lambda: abuse.admit_verify(ACME, "sub_a"), 429, "rate-limited")  # the subject's budget
    refusal(lambda: abuse.admit_verify(ACME, "sub_a"), 429, "rate-limited")
    abuse.admit_verify(ACME, "sub_b")  # the key still had its second request
    problem = refusal(lambda: abuse.admit_verify(ACME, "sub_c"), 429, "rate-limited")  # now the key's
    assert 55 <= int(problem.headers["Retry-After"]) <= 60


def test_budgets_are_atomic_under_concurrency(counters):
    budget = [Budget("key:x:identify", 5, 30)]
    results: list[float | None] = []
    lock = threading.Lock()

    def hit() -> None:
        outcome = counters.take(budget)
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=hit) for _ in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(r is None for r in results) == 5


def test_lockout_after_k_consecutive_failures_reset_by_match_and_by_admin(counters):
    abuse = controls(counters)
    assert not abuse.record_verify(ACME, "sub_a", match=False)
    assert not abuse.record_verify(ACME, "sub_a", match=False)
    assert not abuse.record_verify(ACME, "sub_a", match=True)  # a match resets the count
    assert not abuse.record_verify(ACME, "sub_a", match=False)
    assert not abuse.record_verify(ACME, "sub_a", match=False)
    abuse.admit_verify(ACME, "sub_a")
    assert abuse.record_verify(ACME, "sub_a", match=False)  # the third in a row locks, once
    problem = refusal(lambda: abuse.admit_verify(ACME, "sub_a"), 423, "subject-locked")
    assert 55 <= int(problem.headers["Retry-After"]) <= 60
    refusal(lambda: abuse.admit_verify(ACME_OTHER_KEY, "sub_a"), 423, "subject-locked")  # any key of the tenant
    abuse.admit_verify(GLOBEX, "sub_a")  # another tenant's counters are its own
    abuse.admit_verify(ACME, "sub_b")
    assert abuse.unlock(ACME, "sub_a") is True
    abuse.admit_verify(ACME, "sub_a")
    assert abuse.unlock(ACME, "sub_a") is False


def test_lockout_expires_or_waits_for_an_admin(counters):
    abuse = controls(counters, lockout_failures=1, lockout_s=1)
    assert abuse.record_verify(ACME, "sub_a", match=False)
    refusal(lambda: abuse.admit_verify(ACME, "sub_a"), 423, "subject-locked")
    time.sleep(1.1)
    abuse.admit_verify(ACME, "sub_a")
    forever = controls(counters, lockout_failures=1, lockout_s=0)
    assert forever.record_verify(ACME, "sub_b", match=False)
    problem = refusal(lambda: forever.admit_verify(ACME, "sub_b"), 423, "subject-locked")
    assert "Retry-After" not in problem.headers and "admin" in problem.detail
    assert forever.unlock(ACME, "sub_b")
    forever.admit_verify(ACME, "sub_b")


def test_failures_outside_the_window_do_not_add_up(counters):
    abuse = controls(counters, lockout_failures=2, lockout_window_s=1)
    assert not abuse.record_verify(ACME, "sub_a", match=False)
    time.sleep(1.1)
    assert not abuse.record_verify(ACME, "sub_a", match=False)


def test_zero_disables_a_control(counters):
    abuse = controls(counters, rate_identify_per_key=0, subject_verify_limit=0, rate_verify_per_key=0,
                     lockout_failures=0)
    for _ in range(20):
        abuse.admit(ACME, "identify")
        abuse.admit_verify(ACME, "sub_a")
        assert not abuse.record_verify(ACME, "sub_a", match=False)


# --- log redaction ----------------------------------------------------------------------------------------

SECRET = "pf_0123456789ab_s3cr3t-VALUE_xyz"


@pytest.mark.parametrize("line", [
    f'127.0.0.1:5000 - "GET /v1/transforms?api_key={SECRET} HTTP/1.1" 401',
    f"/v1/verify?x=1&token={SECRET}&y=2", f"/v1/verify?Password={SECRET}", f"Authorization: Bearer {SECRET}",
    f"calling with key {SECRET}",
])
def test_redact_masks_secrets(line):
    assert SECRET not in redact(line) and "s3cr3t" not in redact(line) and "[REDACTED]" in redact(line)


def test_redact_keeps_harmless_query_parameters():
    assert redact("/v1/admin/jobs?page=2&monkey=x") == "/v1/admin/jobs?page=2&monkey=x"


def test_access_log_record_is_redacted_by_the_configured_filter():
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:1", "GET", f"/v1/transforms?api_key={SECRET}", "1.1", 401), None)
    assert RedactSecrets().filter(record)
    assert SECRET not in record.getMessage()
    config = log_config()
    assert all("redact_secrets" in h.get("filters", []) for h in config["handlers"].values())


def test_a_party_refusal_is_a_429_or_a_503_never_a_500() -> None:
    """Regression: a party's 429 (its match-job rate limit) escaped the gateway as an unhandled error (500)."""
    from app.services.biometrics import party_refusal
    from secure.coordinator import PartiesError

    busy = party_refusal(PartiesError("party 0 refused the match job (429 rate-limited)", status=429))
    assert busy.status == 429 and busy.slug == "rate-limited" and busy.headers["Retry-After"] == "1"
    other = party_refusal(PartiesError("party 1 refused the match job (422 validation-error)", status=422))
    assert other.status == 503 and "Retry-After" in other.headers
