"""Concurrent single-query identify jobs on one gallery snapshot run as one batched MPC job (real processes)."""
from __future__ import annotations

import numpy as np
import pytest

from devtools.mpc_cluster import Cluster, encode_trunc, split
from secure.mpc.protocols.base import threshold_raw

D = 128
FAST = {"op_timeout_s": 20, "connect_timeout_s": 30, "heartbeat_s": 0.5, "pair_wait_s": 2.0,
        "retry_backoff_s": 0.2, "torch_threads": 1}


def _unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _want(q: np.ndarray, g_enc: np.ndarray, labels: np.ndarray, thr: float) -> int:
    raw = g_enc @ encode_trunc(q)
    best = int(np.argmax(raw))
    return int(labels[best]) if raw[best] >= threshold_raw(thr) else 0


@pytest.mark.slow
def test_queued_identify_jobs_coalesce_into_one_batch(tmp_path) -> None:
    rng = np.random.default_rng(21)
    n = 30_000  # the first job's mask set-up keeps the worker busy while the others queue up
    g = _unit(rng, n, D)
    labels = np.arange(1, n + 1, dtype=np.int64)
    shares = split(encode_trunc(g), rng)
    queries = [_unit(rng, D) for _ in range(9)]
    for i in range(0, 9, 2):  # genuine matches for half of them
        queries[i] = 0.8 * g[int(rng.integers(n))] + 0.2 * queries[i]
        queries[i] /= np.linalg.norm(queries[i])
    with Cluster(tmp_path, **FAST) as cluster:
        cluster.wait_connected(90)
        results = cluster.run_shared_many("identify", queries, shares, labels, 0.5, rng, timeout=120,
                                          gallery_id="coalesce-test")
    g_enc = encode_trunc(g)
    assert [r[0] for r in results] == [_want(q, g_enc, labels, 0.5) for q in queries]
    coalesced = [int(r[2][0].get("coalesced", 1)) for r in results]
    assert max(coalesced) >= 4, coalesced       # jobs queued behind the first one shared batched jobs
    assert sum(1 / c for c in coalesced) <= len(queries) - 3, coalesced  # fewer MPC jobs than queries
    # the masks were set up once, by the first MPC job (whichever jobs it answered)
    assert sum(r[2][0]["setup_rows"] == n for r in results) == coalesced[0]
    assert all(r[2][0]["setup_rows"] in (0, n) for r in results)


@pytest.mark.slow
@pytest.mark.parametrize("compare", ["dealer-bits", "crypten"])
def test_queued_verify_jobs_coalesce_and_each_is_decided_on_its_own_rows(tmp_path, compare: str) -> None:
    """An identify job with a mask set-up keeps the worker busy; the verify jobs queued behind it (each with its own
    1-4 rows, as a claimed subject's templates) run as batched jobs and answer exactly as they would alone, with
    either comparison protocol."""
    rng = np.random.default_rng(22)
    n = 30_000
    g = _unit(rng, n, D)
    labels = np.arange(1, n + 1, dtype=np.int64)
    blocker = ("identify", _unit(rng, D), split(encode_trunc(g), rng), labels, "coalesce-verify-test")
    jobs, want = [], []
    for i in range(10):
        rows = _unit(rng, 1 + i % 4, D)
        query = _unit(rng, D)
        if i % 2 == 0:  # a genuine claim: close to one of its own rows
            query = 0.8 * rows[-1] + 0.2 * query
            query /= np.linalg.norm(query)
        elif i > 1:  # an impostor that is close to ANOTHER job's rows: must not match
            query = 0.9 * jobs[-1][2][-1] + 0.1 * query
            query /= np.linalg.norm(query)
        jobs.append((query, split(encode_trunc(rows), rng), rows))
        raw = encode_trunc(rows) @ encode_trunc(query)
        want.append(int(raw.max() >= threshold_raw(0.5)))
    with Cluster(tmp_path, **FAST, compare=compare) as cluster:
        cluster.wait_connected(90)
        results = cluster.run_jobs([blocker] + [("verify", q, shares, np.arange(1, len(rows) + 1), None)
                                                for q, shares, rows in jobs], 0.5, rng, timeout=120)
    assert [r[0] for r in results[1:]] == want and set(want) == {0, 1}
    coalesced = [int(r[2][0].get("coalesced", 1)) for r in results[1:]]
    assert max(coalesced) >= 4, coalesced
    assert sum(1 / c for c in coalesced) <= len(jobs) - 3, coalesced  # fewer MPC jobs than verifies
