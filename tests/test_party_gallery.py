"""In-memory gallery: snapshot semantics, ordering, views vs copies, growth."""
from __future__ import annotations

import time

import numpy as np
import pytest

from secure.party.gallery import DimensionMismatch, Gallery, SnapshotTooOld


def _labels_at(g: Gallery, rows: dict, expect: dict) -> None:
    for upto, labels in expect.items():
        shares, lab = g.snapshot("v", upto)
        assert lab.tolist() == labels, upto
        assert np.array_equal(shares, np.stack([rows[t] for t in labels]) if labels else shares)


def test_snapshot_semantics_with_interleaved_deletes():
    g = Gallery()
    rows = {t: np.full(4, t, np.int64) for t in (1, 2, 3, 4)}
    g.add("v", 1, 1, rows[1])
    g.add("v", 2, 2, rows[2])
    _labels_at(g, rows, {0: [], 1: [1], 2: [1, 2]})
    g.delete(1, 3)  # seq 3 deletes template 1
    g.add("v", 4, 5, rows[4])  # seq 5 stores template 4 (committed before 4)
    g.add("v", 3, 4, rows[3])  # seq 4 stores template 3
    _labels_at(g, rows, {3: [2], 4: [2, 3], 5: [2, 3, 4], 100: [2, 3, 4]})
    assert g.rows_for("v", 5, [4, 2, 99])[1].tolist() == [2, 4]
    g.delete(4, 6)
    _labels_at(g, rows, {6: [2, 3], 100: [2, 3]})
    with pytest.raises(SnapshotTooOld):  # the erased row cannot be served any more: older snapshots are refused
        g.snapshot("v", 5)
    assert g.rows_for("v", 6, [4])[1].tolist() == []
    assert g.snapshot("other", 5)[1].size == 0
    assert g.counts()["v"] == {"rows": 2, "deleted": 0, "dim": 4}
    with pytest.raises(DimensionMismatch):
        g.add("v", 9, 9, np.zeros(5, np.int64))


def test_deleted_rows_leave_memory_and_views_stay_valid():
    """Erasure is real: a deleted row's share is in no buffer of the gallery, and a view handed out before
    the delete (a running job's snapshot) is unchanged."""
    g = Gallery()
    secret = np.arange(7, 11, dtype=np.int64) * 1_000_003
    g.add("v", 1, 1, np.zeros(4, np.int64))
    g.add("v", 2, 2, secret)
    g.add("v", 3, 3, np.ones(4, np.int64))
    view, _ = g.snapshot("v", 3)
    assert g.erase([2, 99], 4) == 1
    held = g._galleries["v"]
    assert not any(np.array_equal(row, secret) for row in held.shares[: held.capacity])
    assert 2 not in held.index and not g.has(2)
    assert g.snapshot("v", 4)[1].tolist() == [1, 3]
    assert np.array_equal(view[1], secret)  # the earlier view is a separate, still valid buffer
    assert g.erase([2], 5) == 0 and g.delete(2, 5) is False  # idempotent


def test_full_snapshot_is_a_readonly_view_and_stays_valid():
    g = Gallery()
    g.add_many("v", np.arange(1, 101), np.arange(1, 101), np.arange(400, dtype=np.int64).reshape(100, 4))
    s, lab = g.snapshot("v", 100)
    assert not s.flags.writeable and not s.flags.owndata
    before = s.copy()
    g.add_many("v", np.arange(101, 1101), np.arange(101, 1101), np.ones((1000, 4), np.int64))  # forces growth
    g.add("v", 5000, 2000, np.zeros(4, np.int64))
    g.add("v", 4000, 1500, np.zeros(4, np.int64))  # out of order: triggers a re-sort into fresh arrays
    g.snapshot("v", 3000)
    assert np.array_equal(s, before) and lab.tolist() == list(range(1, 101))
    assert g.snapshot("v", 3000)[1][-2:].tolist() == [4000, 5000]


def test_append_scales():
    g = Gallery()
    n, d, batch = 200_000, 16, 10_000
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        seqs = np.arange(i + 1, i + batch + 1)
        g.add_many("v", seqs, seqs, np.zeros((batch, d), np.int64))
    for t in range(1, 2001):
        g.add("v", n + t, n + t, np.zeros(d, np.int64))
    shares, labels = g.snapshot("v", 10**9)
    assert shares.shape == (n + 2000, d)
    assert time.perf_counter() - t0 < 10
