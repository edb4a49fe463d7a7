"""The gateway's per-verify database work does not grow with the gallery (real SQLite and PostgreSQL).

Three queries used to read every operation or enrollment on each verify (the committed count of a snapshot, the
unacknowledged decisions, the earlier model versions in use); they now use a running total and two indexes.
These tests check that the answers are unchanged, that the databases really use the indexes, and that the
measured cost of a verify is flat from 200 to 20,000 subjects.
"""
from __future__ import annotations

import random
from datetime import datetime, timezone

import pytest
from alembic import command
from sqlalchemy import func, insert, select, text
from sqlalchemy.orm import Session, sessionmaker

from app.db import Base, make_engine, make_sessionmaker, session_scope
from app.migrate import gateway_alembic_config, migrate_gateway
from app.models import Enrollment, ModelVersion, Operation, OperationTotals, Subject, Tenant, unacknowledged
from app.services import operations
from app.services.biometrics import versions_in_use
from bench import gateway_db
from tests.schema_check import schema_differences


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path, postgres_db) -> str:
    return f"sqlite:///{tmp_path / 'gw.db'}" if request.param == "sqlite" else postgres_db()


def _sessions(url: str) -> sessionmaker[Session]:
    migrate_gateway(url)
    return make_sessionmaker(make_engine(url))


def _brute_committed(session: Session, upto: int) -> int:
    return int(session.execute(select(func.count()).select_from(Operation).where(
        Operation.state == "committed", Operation.seq <= upto)).scalar() or 0)


def test_the_gateway_migrations_match_the_models(url):
    migrate_gateway(url)
    migrate_gateway(url)  # idempotent
    engine = make_engine(url)
    assert schema_differences(engine, Base.metadata) == []
    engine.dispose()


def test_the_committed_count_of_every_snapshot_equals_a_count_of_the_log(url):
    sessions = _sessions(url)
    rng = random.Random(7)
    seqs = [operations.begin(sessions, "store", "g", [], {}) for _ in range(40)]
    for seq in rng.sample(seqs, len(seqs)):  # decided out of order, some twice, some never
        commit = rng.random() < 0.7
        operations.decide(sessions, seq, commit=commit)
        if rng.random() < 0.3:
            assert operations.decide(sessions, seq, commit=not commit) is False  # never flips, never counts twice
        if rng.random() < 0.1:
            break

    def refuse(_session: Session, _op: Operation) -> None:
        raise LookupError("subject was deleted while enrolling")

    undecided = operations.begin(sessions, "store", "g", [], {})
    with pytest.raises(LookupError):  # a commit whose metadata fails is rolled back, total included
        operations.decide(sessions, undecided, commit=True, apply=refuse)
    with session_scope(sessions) as session:
        for upto in [0, *seqs, undecided]:
            assert operations.committed_through(session, upto) == _brute_committed(session, upto), upto
        total = session.execute(select(OperationTotals.committed)).scalar_one()
        assert total == _brute_committed(session, undecided) > 0


def test_the_upgrade_counts_what_was_committed_before_it(url):
    config = gateway_alembic_config(url)
    command.upgrade(config, "0004")
    engine = make_engine(url)
    now = datetime.now(timezone.utc)
    with engine.begin() as conn:
        conn.execute(insert(Operation), [
            {"kind": "store", "template_seqs": [], "model_version": "g", "state": state, "acked_0": i != 5,
             "acked_1": True, "context": {}, "created_at": now, "updated_at": now}
            for i, state in enumerate(["committed", "aborted", "committed", "committed", "committed"], start=1)])
        # seqs 1-5, given by the database (an explicit seq would not move PostgreSQL's sequence)
    command.upgrade(config, "head")
    sessions = make_sessionmaker(engine)
    with session_scope(sessions) as session:
        assert [operations.committed_through(session, upto) for upto in range(6)] == [0, 1, 1, 2, 3, 4]
        unacked = session.execute(select(Operation.seq).where(unacknowledged())).scalars().all()
        assert unacked == [5]
    seq = operations.begin(sessions, "store", "g", [], {})
    operations.decide(sessions, seq, commit=True)
    with session_scope(sessions) as session:
        assert operations.committed_through(session, seq) == 5
    engine.dispose()


def test_versions_in_use_are_those_holding_the_tenants_current_templates(url):
    sessions = _sessions(url)
    now = datetime.now(timezone.utc)
    spec = {"path": "x", "sha256": "0" * 64, "transform_id": "t", "params_hash": "p", "embedding_dim": 8,
            "threshold": 0.3, "metrics": {}, "preset": "accurate", "status": "retired"}
    with session_scope(sessions) as session:
        session.add_all([Tenant(id="a", name="a"), Tenant(id="b", name="b")])
        session.add_all([ModelVersion(version=v, activated_at=datetime(2026, 1, day, tzinfo=timezone.utc), **spec)
                         for day, v in enumerate(["v1", "v2", "v3", "v4", "v5"], start=1)])
        session.flush()
        session.add_all([Subject(id="sa", tenant_id="a"), Subject(id="sb", tenant_id="b")])
        session.flush()
        rows = [("sa", "a", "v1", 1), ("sa", "a", "v2", 2), ("sa", "a", "v3", 2), ("sa", "a", "v5", 2),
                ("sb", "b", "v4", 2)]  # v1: the tenant's old key; v4: another tenant's; v5: the active one
        session.add_all([Enrollment(template_seq=i, subject_id=s, tenant_id=t, model_version=v, key_version=k,
                                    transform_id="t", created_at=now) for i, (s, t, v, k) in enumerate(rows, 1)])
    with session_scope(sessions) as session:
        assert [m.version for m in versions_in_use(session, "a", 2, "v5")] == ["v3", "v2"]  # newest first
        assert [m.version for m in versions_in_use(session, "a", 1, "v5")] == ["v1"]
        assert versions_in_use(session, "c", 2, "v5") == []


def _plan(session: Session, dialect: str, statement: str) -> str:
    if dialect == "sqlite":
        return " ".join(str(row[-1]) for row in session.execute(text("EXPLAIN QUERY PLAN " + statement)))
    session.execute(text("SET LOCAL enable_seqscan = off"))  # tiny tables: ask whether the index CAN serve
    return " ".join(str(row[0]) for row in session.execute(text("EXPLAIN " + statement)))


def test_the_per_verify_queries_use_their_indexes(url):
    sessions = _sessions(url)
    dialect = "sqlite" if url.startswith("sqlite") else "postgresql"
    with session_scope(sessions) as session:
        bind = session.get_bind()

        def sql(statement) -> str:
            return str(statement.compile(bind, compile_kwargs={"literal_binds": True}))

        unacked = sql(select(Operation.seq).where(unacknowledged(), Operation.seq <= 10,
                                                  Operation.state != "preparing"))
        assert "ix_operations_unacknowledged" in _plan(session, dialect, unacked)
        holds = sql(select(Enrollment.template_seq).where(Enrollment.tenant_id == "a", Enrollment.key_version == 1,
                                                          Enrollment.model_version == "v1").limit(1))
        assert "ix_enrollments_tenant_key_model" in _plan(session, dialect, holds)


def test_a_verify_costs_the_same_database_work_at_20000_subjects_as_at_200():
    """The bench's own measurement (SQLite, CPU time, median of three passes): before the totals and indexes,
    20,000 subjects cost ~2.5x the database CPU of 200 per verify; now they must cost under 1.5x."""
    report = gateway_db.main(["--sizes", "200,20000", "--repeats", "30", "--passes", "3"])
    small, large = (result["total"]["cpu_ms"] for result in report["results"])
    assert large < 1.5 * small, report


@pytest.mark.parametrize("argv", [["--sizes", "1000,lots"], ["--sizes", "0"], ["--repeats", "0"]])
def test_the_bench_refuses_bad_arguments_in_one_line(argv, capsys):
    with pytest.raises(SystemExit) as refused:
        gateway_db.main(argv)
    assert refused.value.code == 2
    assert "must be" in capsys.readouterr().err
