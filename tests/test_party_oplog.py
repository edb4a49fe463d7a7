"""Party op log and gallery against real SQLite and PostgreSQL databases (no SQL mocks)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from secure.party.db import make_party_engine, migrate_party_db
from secure.party.gallery import Gallery, SnapshotTooOld
from secure.party.models import OpRow, ShareRow
from secure.party.oplog import Behind, Diverged, OpConflict, OpInvalid, OpLog, OpSpec, OpUnknown
from secure.sharing import random_ring, to_bytes

_spec = importlib.util.spec_from_file_location("party_harness", Path(__file__).with_name("party_harness.py"))
harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(harness)

D = 8


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'party.db'}"
        return
    if not harness.pg_available():
        pytest.fail("PostgreSQL is not reachable; run scripts/services.sh")
    name, url = harness.create_pg_database()
    try:
        yield url
    finally:
        harness.drop_pg_database(name)


def new_log(url: str) -> tuple[OpLog, object]:
    migrate_party_db(url)
    engine = make_party_engine(url)
    log = OpLog(sessionmaker(engine, expire_on_commit=False), Gallery())
    log.load()
    return log, engine


def store(seq: int, tseq: int, share: np.ndarray, mv: str = "v1") -> OpSpec:
    return OpSpec(seq=seq, kind="store", gallery=mv, template_seq=tseq, share=to_bytes(share))


def test_two_phase_lifecycle_and_replay(db_url):
    log, engine = new_log(db_url)
    shares = {i: random_ring(D) for i in range(1, 8)}
    for seq in range(1, 6):
        assert log.prepare(store(seq, seq, shares[seq])) == "prepared"
    assert log.prepare(store(2, 2, shares[2])) == "prepared"  # idempotent replay
    with pytest.raises(OpConflict):
        log.prepare(store(2, 2, shares[3]))  # same seq, other content
    with pytest.raises(OpConflict):
        log.prepare(store(6, 1, shares[6]))  # template 1 already pending
    with pytest.raises(OpInvalid):
        log.prepare(OpSpec(seq=9, kind="store", gallery="v1", template_seq=9, share=b"\x00" * 5))
    assert log.applied_through == 0 and log.pending_seqs() == [1, 2, 3, 4, 5]

    # out-of-order decisions
    assert log.commit(3) == "committed"
    assert log.commit(1) == "committed"
    assert log.commit(1) == "committed"  # idempotent
    assert log.abort(2) == "aborted"
    assert log.abort(2) == "aborted"
    with pytest.raises(OpConflict):
        log.commit(2)
    with pytest.raises(OpConflict):
        log.abort(1)
    with pytest.raises(OpUnknown):
        log.commit(99)
    assert log.applied_through == 3  # 4 and 5 pending
    with pytest.raises(Behind) as exc:
        log.check_ready(4)
    assert exc.value.extra["pending"] == [4]
    log.check_ready(3, expected_committed=2)
    with pytest.raises(Behind):
        log.check_ready(3, expected_committed=3)
    with pytest.raises(Diverged):
        log.check_ready(3, expected_committed=1)

    # abort of an unknown seq leaves a tombstone: a late prepare of it is refused
    assert log.abort(7) == "aborted"
    with pytest.raises(OpConflict):
        log.prepare(store(7, 7, shares[7]))
    with pytest.raises(OpConflict):
        log.prepare(store(2, 2, shares[2]))  # aborted stays aborted

    log.commit(4)
    # a delete of template 1 (and an unknown template) while 5 is pending
    assert log.prepare(OpSpec(seq=8, kind="delete", template_seqs=(1, 1000))) == "prepared"
    with pytest.raises(OpConflict):
        log.prepare(OpSpec(seq=10, kind="delete", template_seqs=(5,)))  # 5's store is pending
    log.commit(8)
    log.commit(5)
    assert log.applied_through == 8 and log.pending_seqs() == []

    with pytest.raises(SnapshotTooOld):  # template 1 left memory at its delete: older snapshots are refused
        log.gallery.snapshot("v1", 4)
    shares_at, labels_at = log.gallery.snapshot("v1", 8)
    assert labels_at.tolist() == [3, 4, 5]
    assert np.array_equal(shares_at, np.stack([shares[3], shares[4], shares[5]]))

    # the DB holds no payload after decisions, and the deleted share is erased
    with log.sessions() as s:
        assert all(p is None for p in s.scalars(select(OpRow.payload)))
        row = s.get(ShareRow, 1)
        assert row.share is None and row.del_seq == 8
        assert s.get(ShareRow, 3).share == to_bytes(shares[3])

    # replay from the DB rebuilds the same state
    log2 = OpLog(log.sessions, Gallery())
    log2.load()
    assert log2.applied_through == log.applied_through and log2.committed_count() == log.committed_count()
    s8, l8 = log2.gallery.snapshot("v1", 8)
    assert l8.tolist() == [3, 4, 5] and np.array_equal(s8, log.gallery.snapshot("v1", 8)[0])
    with pytest.raises(SnapshotTooOld):  # template 1's share was erased before loading
        log2.gallery.snapshot("v1", 4)
    engine.dispose()


def test_pending_ops_survive_reload(db_url):
    log, engine = new_log(db_url)
    share = random_ring(D)
    log.prepare(store(1, 11, share))
    log2 = OpLog(log.sessions, Gallery())
    log2.load()
    assert log2.pending_seqs() == [1]
    with pytest.raises(OpConflict):
        log2.prepare(store(2, 11, random_ring(D)))  # template 11's store is still pending after reload
    assert log2.commit(1) == "committed"
    assert log2.gallery.snapshot("v1", 1)[1].tolist() == [11]
    engine.dispose()


def test_migration_matches_models(db_url):
    from secure.party.models import PartyBase
    from tests.schema_check import schema_differences

    migrate_party_db(db_url)
    migrate_party_db(db_url)  # idempotent
    engine = make_party_engine(db_url)
    diff = schema_differences(engine, PartyBase.metadata)
    engine.dispose()
    assert diff == []


def _files_hold(paths: list[Path], needle: bytes) -> bool:
    return any(p.exists() and needle in p.read_bytes() for p in paths)


def test_delete_overwrites_the_share_in_the_sqlite_files(tmp_path):
    """A committed delete leaves no copy of the share bytes in the SQLite database or its WAL
    (secure_delete zeroes the freed cells; the TRUNCATE checkpoint drops the WAL's older page images)."""
    url = f"sqlite:///{tmp_path / 'party.db'}"
    log, engine = new_log(url)
    share = random_ring(128)
    keep = random_ring(128)
    for seq, tseq, s in ((1, 1, share), (2, 2, keep)):
        log.prepare(store(seq, tseq, s))
        log.commit(seq)
    files = [tmp_path / "party.db", tmp_path / "party.db-wal"]
    secret = to_bytes(share)
    assert _files_hold(files, secret)
    log.prepare(OpSpec(seq=3, kind="delete", template_seqs=(1,)))
    log.commit(3)
    assert not any(_files_hold(files, secret[i:i + 16]) for i in range(0, len(secret), 16))
    assert _files_hold(files, to_bytes(keep))  # the other template is untouched
    engine.dispose()
    fresh, _ = new_log(url)  # and a restart serves the remaining row only
    assert fresh.match_rows("v1", 3)[1].tolist() == [2]


def test_delete_leaves_no_readable_row_version_in_postgresql():
    """PostgreSQL keeps an updated row's old version in the heap until VACUUM: after a committed delete no
    heap tuple of either table (live or dead, read with pageinspect) still carries the share bytes."""
    import psycopg

    if not harness.pg_available():
        pytest.fail("PostgreSQL is not reachable; run scripts/services.sh")
    name, url = harness.create_pg_database()
    try:
        log, engine = new_log(url)
        share = random_ring(128)
        log.prepare(store(1, 1, share))
        log.commit(1)
        log.prepare(OpSpec(seq=2, kind="delete", template_seqs=(1,)))
        log.commit(2)
        engine.dispose()
        plain = url.replace("postgresql+psycopg", "postgresql")
        with psycopg.connect(plain, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pageinspect")
            datas = []
            for table in ("shares", "ops"):
                pages = conn.execute(f"SELECT pg_relation_size('{table}') / current_setting('block_size')::int").fetchone()[0]
                for page in range(int(pages)):
                    datas += [bytes(r[0]) for r in conn.execute(
                        "SELECT t_data FROM heap_page_items(get_raw_page(%s, %s)) WHERE t_data IS NOT NULL",
                        (table, page)).fetchall()]
        secret = to_bytes(share)
        assert datas and not any(secret[:16] in d for d in datas)
    finally:
        harness.drop_pg_database(name)
