"""Coalesced verify jobs (``secure/mpc/runtime/coalesce.py``): each query is decided on its own rows only.

Fast tests of the pieces (own_rows, which jobs coalesce, the combined job and its digest, the comparison on the
kept rows against plaintext); the real-process test is in ``tests/test_mpc_coalesce.py``.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from secure.mpc.protocols.base import own_rows
from secure.mpc.runtime.coalesce import coalescible, combined_job, digest_of, split_output
from secure.mpc.runtime.messages import WorkerJob
from tests.test_mpc_compare import plain, run_match

D = 8


def _job(job_id: str, rows: int, rng: np.random.Generator, kind: str = "verify") -> WorkerJob:
    return WorkerJob(job_id=job_id, kind=kind, query=rng.integers(-9, 9, D), gallery=rng.integers(-9, 9, (rows, D)),
                     labels=np.arange(1, rows + 1, dtype=np.int64), threshold=0.5)


def test_own_rows_keeps_each_querys_rows_and_repeats_its_first_as_filler() -> None:
    scores = torch.arange(6 * 3, dtype=torch.int64).reshape(6, 3)  # rows 0-2 query 0's, row 3 query 1's, 4-5 query 2's
    kept = own_rows(scores, (3, 1, 2))
    assert kept.tolist() == [[0, 10, 14], [3, 10, 17], [6, 10, 14]]
    assert own_rows(scores[:2, :1], (2,)).tolist() == [[0], [3]]


def test_verify_jobs_coalesce_by_kind_threshold_and_width_only() -> None:
    rng = np.random.default_rng(0)
    a, b = _job("a", 2, rng), _job("b", 5, rng)
    assert coalescible(a, b)
    assert not coalescible(a, b, verify=False)
    assert not coalescible(a, replace(b, threshold=0.6))
    assert not coalescible(a, replace(b, gallery=rng.integers(-9, 9, (5, D + 1))))
    assert not coalescible(a, replace(b, sealed=object()))
    assert not coalescible(a, _job("c", 2, rng, kind="identify"))
    assert not coalescible(a, replace(b, query=np.stack([b.query, b.query])))


def test_the_combined_verify_stacks_rows_and_its_digest_names_the_split() -> None:
    rng = np.random.default_rng(1)
    group = [_job("a", 2, rng), _job("b", 1, rng), _job("c", 3, rng)]
    job = combined_job(group)
    assert job.members == ("a", "b", "c") and job.row_counts == (2, 1, 3) and not job.resident
    assert job.gallery is not None and job.gallery.shape == (6, D) and job.query.shape == (3, D)
    assert np.array_equal(job.gallery[2], group[1].gallery[0])
    other_split = replace(job, row_counts=(1, 2, 3))
    assert digest_of(job, "cpu") != digest_of(other_split, "cpu")
    assert split_output(job, [7, 8, 9]) == [("a", 7), ("b", 8), ("c", 9)]
    assert job.inputs().compared_rows == 3 and group[1].inputs().compared_rows == 1


@pytest.mark.parametrize("counts", [(1, 1), (3, 1, 4), (2, 5, 1, 1, 7)])
def test_each_member_is_decided_on_its_own_rows_as_if_it_ran_alone(counts: tuple[int, ...]) -> None:
    """The whole pipeline after the scores: every stacked row scored against every query, own_rows, then the
    dealer-bits comparison; a strong score on ANOTHER member's row must not make a query match."""
    rng = np.random.default_rng(sum(counts))
    q, n = len(counts), sum(counts)
    t_raw = 1 << 31
    scores = rng.integers(-(2**32), t_raw - 1, size=(n, q))  # nothing matches...
    starts = np.cumsum((0,) + counts[:-1])
    for j in range(0, q, 2):  # ...except every other query on one of its own rows
        scores[starts[j] + counts[j] - 1, j] = t_raw + 5
    for j in range(1, q, 2):  # and the odd queries score high on someone else's row only
        scores[starts[(j + 1) % q], j] = 2**33
    kept = own_rows(torch.from_numpy(scores), counts).numpy()
    got, _ = run_match("verify", kept, np.zeros(kept.shape[0], np.int64), t_raw, q)
    alone = [plain("verify", scores[s:s + c, j:j + 1], np.zeros(c, np.int64), t_raw)[0]
             for j, (s, c) in enumerate(zip(starts, counts))]
    assert got.tolist() == alone == [1 - j % 2 for j in range(q)]
