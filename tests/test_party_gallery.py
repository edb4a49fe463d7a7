"""In-memory gallery: snapshot semantics, ordering, views vs copies, growth."""
from __future__ import annotations

import time

import numpy as np
import pytest

from secure.party.gallery import DimensionMismatch, Gallery


def test_snapshot_semantics_with_interleaved_deletes():
    g = Gallery()
    rows = {t: np.full(4, t, np.int64) for t in (1, 2, 3, 4)}
    g.add("v", 1, 1, rows[1])
    g.add("v", 2, 2, rows[2])
    g.delete(1, 3)  # seq 3 deletes template 1
    g.add("v", 4, 5, rows[4])  # seq 5 stores template 4 (committed before 4)
    g.add("v", 3, 4, rows[3])  # seq 4 stores template 3
    g.delete(4, 6)
    expect = {0: [], 1: [1], 2: [1, 2], 3: [2], 4: [2, 3], 5: [2, 3, 4], 6: [2, 3], 100: [2, 3]}
    for upto, labels in expect.items():
        shares, lab = g.snapshot("v", upto)
        assert lab.tolist() == labels, upto
        assert np.array_equal(shares, np.stack([rows[t] for t in labels]) if labels else shares)
    assert g.rows_for("v", 5, [4, 2, 99])[1].tolist() == [2, 4]
    assert g.rows_for("v", 6, [4])[1].tolist() == []
    assert g.snapshot("other", 5)[1].size == 0
    assert g.counts()["v"] == {"rows": 2, "deleted": 2, "dim": 4}
    with pytest.raises(DimensionMismatch):
        g.add("v", 9, 9, np.zeros(5, np.int64))


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
