"""Fast unit tests of the gateway's pieces on real SQLite and PostgreSQL databases."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from app.auth import authenticate, create_api_key, ensure_tenant, tenant_template_key
from app.db import make_engine, make_sessionmaker, session_scope
from app.migrate import migrate_gateway
from app.models import ApiKey, Operation
from app.problems import Problem
from app.schemas import FeaturePayload
from app.services import operations
from app.services.features import check_epsilon
from app.services.replay import check_freshness
from app.settings import GatewaySettings
from inference.transform import default_spec


@pytest.fixture(params=["sqlite", "postgresql"])
def sessions(request, tmp_path, postgres_db):
    url = f"sqlite:///{tmp_path / 'gw.db'}" if request.param == "sqlite" else postgres_db()
    migrate_gateway(url)
    engine = make_engine(url)
    yield make_sessionmaker(engine)
    engine.dispose()


def test_settings_parse_party_urls_and_refuse_dev_secrets_off_loopback(monkeypatch):
    monkeypatch.setenv("PRIVFACE_PARTY_URLS", "https://p0:1, https://p1:2")
    settings = GatewaySettings()
    assert settings.party_urls == ("https://p0:1", "https://p1:2")
    settings.refuse_dev_secrets_off_loopback()  # loopback: fine
    with pytest.raises(SystemExit, match="PRIVFACE_SECRET_KEY"):
        settings.model_copy(update={"host": "0.0.0.0"}).refuse_dev_secrets_off_loopback()
    real = settings.model_copy(update={"host": "0.0.0.0", "secret_key": "s" * 32, "party0_token": "a" * 32,
                                       "party1_token": "b" * 32})
    real.refuse_dev_secrets_off_loopback()


def test_api_keys_hashed_scoped_and_revocable(sessions):
    with session_scope(sessions) as session:
        ensure_tenant(session, "acme")
        key = create_api_key(session, "acme", ["verify"], "master")
        with pytest.raises(ValueError, match="unknown or empty scopes"):
            create_api_key(session, "acme", ["root"], "master")
    with session_scope(sessions) as session:
        stored = session.query(ApiKey).one()
        assert key.split("_", 2)[2] not in stored.secret_hash  # only a keyed hash is stored
        principal = authenticate(session, key, "master")
        assert principal.tenant_id == "acme" and principal.scopes == frozenset({"verify"})
        assert authenticate(session, key, "other-master") is None
        assert authenticate(session, key[:-1] + ("A" if key[-1] != "A" else "B"), "master") is None
        assert authenticate(session, "garbage", "master") is None
        stored.revoked_at = datetime.now(timezone.utc)
    with session_scope(sessions) as session:
        assert authenticate(session, key, "master") is None


def test_tenant_keys_differ_per_tenant_and_version():
    keys = {tenant_template_key("m", t, v) for t in ("a", "b") for v in (1, 2)}
    assert len(keys) == 4 and all(len(k) == 32 for k in keys)


def test_snapshot_stops_before_the_oldest_undecided_operation(sessions):
    seqs = [operations.begin(sessions, "store", "g", [], {}) for _ in range(4)]
    operations.decide(sessions, seqs[0], commit=True)
    operations.decide(sessions, seqs[2], commit=False)
    operations.decide(sessions, seqs[3], commit=True)
    with session_scope(sessions) as session:
        assert operations.decided_through(session) == seqs[1] - 1  # seq 2 is still preparing
        assert operations.committed_through(session, seqs[3]) == 2
    operations.decide(sessions, seqs[1], commit=False)
    with session_scope(sessions) as session:
        assert operations.decided_through(session) == seqs[3]
    assert operations.decide(sessions, seqs[1], commit=True) is False  # a decision never flips
    with session_scope(sessions) as session:
        assert session.get(Operation, seqs[1]).state == "aborted"


class RecordingPair:
    """The one PartyPair call ``settle`` makes (``decide_at``), answered as a party that acknowledges."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, int, bool]] = []

    async def decide_at(self, rank: int, seq: int, commit: bool) -> bool:
        self.sent.append((rank, seq, commit))
        return True


def test_settled_snapshot_reaches_every_earlier_decision_and_delivers_it(sessions):
    """Read-your-writes under concurrency (issue 13): op 2 is decided (its client got a 201) while op 1 of a
    concurrent request is still preparing; the snapshot waits for op 1 and hands both parties every decision
    in it that they have not acknowledged, so neither answers 'behind'."""
    import asyncio

    seqs = [operations.begin(sessions, "store", "g", [], {}) for _ in range(3)]
    operations.decide(sessions, seqs[1], commit=True)
    pair = RecordingPair()

    async def scenario() -> tuple[int, int]:
        async def decide_later() -> None:
            await asyncio.sleep(0.2)
            operations.decide(sessions, seqs[0], commit=False)

        waiter = asyncio.create_task(operations.settled_snapshot(sessions, pair, wait_s=5))
        await decide_later()
        return await waiter

    upto, committed = asyncio.run(scenario())
    assert (upto, committed) == (seqs[1], 1)  # seq 3 is preparing: not in the snapshot
    assert sorted(pair.sent) == [(0, seqs[0], False), (0, seqs[1], True), (1, seqs[0], False), (1, seqs[1], True)]
    pair.sent.clear()
    assert asyncio.run(operations.settled_snapshot(sessions, pair, wait_s=1)) == (seqs[1], 1)
    assert pair.sent == []  # acknowledged decisions are not sent again
    operations.decide(sessions, seqs[2], commit=True)
    with session_scope(sessions) as session:
        session.add(Operation(kind="store", model_version="g", template_seqs=[], context={}))  # stays preparing
    operations.decide(sessions, operations.begin(sessions, "store", "g", [], {}), commit=True)
    with pytest.raises(TimeoutError):
        asyncio.run(operations.settled_snapshot(sessions, pair, wait_s=0.2))


def _payload(**override) -> FeaturePayload:
    spec = default_spec()
    body = {"transform_id": spec.transform_id, "params_hash": spec.params_hash, "shape": list(spec.shape),
            "dtype": "float16", "data": "", "epsilon": spec.epsilon_per_image, "nonce": "ab" * 16,
            "created_at": datetime.now(timezone.utc)}
    body.update(override)
    return FeaturePayload(**body)


def test_epsilon_must_be_stated_honestly_and_within_policy():
    spec = default_spec()
    check_epsilon(_payload(), spec, None)
    with pytest.raises(Problem, match="differs"):
        check_epsilon(_payload(epsilon=1.0), spec, None)
    with pytest.raises(Problem) as refused:
        check_epsilon(_payload(), spec, epsilon_max=10.0)
    assert refused.value.slug == "epsilon-policy"


def test_payload_freshness_window():
    check_freshness(_payload(), 600, 300)
    for when in (datetime.now(timezone.utc) - timedelta(hours=1), datetime.now(timezone.utc) + timedelta(hours=1)):
        with pytest.raises(Problem):
            check_freshness(_payload(created_at=when), 600, 300)


def test_a_cancel_request_is_seen_at_the_next_progress_report_and_a_job_done_anyway_says_so(sessions):
    """Regression: a one-round federated job asked to stop only learnt of it at the next heartbeat (a third of
    the lease), finished and published its model; now every progress report reads the request, and a job
    that ends ``succeeded`` while ``cancelling`` says the request came too late."""
    from app.models import Job
    from app.services.jobs import JobReporter, _finish, cancel_job

    with session_scope(sessions) as session:
        session.add(Job(id="job_a", kind="federated", params={}, status="running"))
        session.add(Job(id="job_b", kind="federated", params={}, status="running"))
    reporter = JobReporter(sessions, "job_a")
    reporter.progress(0.5, "round 1")
    assert not reporter.cancel_requested.is_set()
    assert cancel_job(sessions, "job_a").status == "cancelling"
    reporter.progress(0.9, "registering the candidate")
    assert reporter.cancel_requested.is_set()

    cancel_job(sessions, "job_b")
    _finish(sessions, "job_b", "succeeded", "done", {"version": "fed-x"})
    with session_scope(sessions) as session:
        job = session.get_one(Job, "job_b")
        assert job.status == "succeeded" and "cancel request came after" in (job.message or "")


def test_a_cancel_racing_the_worker_either_stops_the_job_or_finds_it_running_never_both(sessions, tmp_path):
    """Regression (a CI run under two test workers): the worker read `queued` then wrote `running` while a cancel
    read `queued` then wrote `cancelled`; the last write won, so a job the admin was told was cancelled ran and
    ended `succeeded`. Both now take the row with a conditional update: each race ends one way or the other."""
    import threading

    from app.models import Job
    from app.services.jobs import cancel_job, execute

    url = sessions.kw["bind"].url.render_as_string(hide_password=False)
    settings = GatewaySettings(database_url=url, model_dir=tmp_path)
    seen = set()
    for i in range(20):
        job_id = f"job_race{i}"
        with session_scope(sessions) as session:  # register-model of a missing path: fails at once when it runs
            session.add(Job(id=job_id, kind="register-model", params={"path": "missing"}, status="queued"))
        start, said = threading.Barrier(2), {}

        def run() -> None:
            start.wait()
            execute(job_id, settings)

        def cancel() -> None:
            start.wait()
            try:
                said["answer"] = cancel_job(sessions, job_id).status
            except Problem as problem:
                said["answer"] = problem.slug

        threads = [threading.Thread(target=run), threading.Thread(target=cancel)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        with session_scope(sessions) as session:
            final = session.get_one(Job, job_id).status
        if said["answer"] == "cancelled":
            assert final == "cancelled", (i, said, final)  # told cancelled: it never ran
        else:  # the worker took it first: a running register-model cannot stop, and it ran to its end
            assert said["answer"] in ("job-not-cancellable", "job-finished") and final == "failed", (i, said, final)
        seen.add(said["answer"])
    assert seen, "no race ran"
