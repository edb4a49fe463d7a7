"""Coalescing: single-query jobs queued behind each other run as one batched MPC job.

* identify (and a shard's identify-best): jobs on the same resident snapshot share one knockout tournament (the
  same rounds as one query).
* verify: jobs on any rows (each its own claimed subject's templates) run as one batch whose gallery is the
  members' rows stacked; ``row_counts`` says which rows are whose, and the score step keeps each query's own rows
  (``protocols/base.py::own_rows``), so the knockout is as deep as the largest member's and the rounds are one
  verify's.

Party 0 takes the oldest job and up to ``coalesce_max`` - 1 coalescible jobs right behind it and announces the group
with its digest; party 1 forms the same group from its own queue (waiting up to ``COALESCE_WAIT_S`` for missing
members) or both keep the jobs and party 0 announces the first one alone. ``job_digest`` is what both parties
compare before running a job. Grouping depends on the queue only (arrival order, kinds, sizes), never on a result.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from typing import cast

import numpy as np

from secure.mpc.protocols.base import Output
from secure.mpc.runtime.messages import WorkerJob

COALESCE_WAIT_S = 0.05  # how long party 1 waits for the other members of a group party 0 announced


def job_digest(kind: str, n: int, d: int, threshold: float, labels: np.ndarray, device: str, batch: int = 0,
               row_counts: tuple[int, ...] | None = None) -> str:
    """What both parties must agree on before running a job. ``batch``: 0 for one query, Q for a batch of Q;
    ``row_counts``: a coalesced verify's rows per query."""
    h = hashlib.sha256()
    head: list[object] = [kind, int(n), int(d), float(threshold).hex(), device] + ([int(batch)] if batch else [])
    if row_counts is not None:
        head.append([int(c) for c in row_counts])
    h.update(json.dumps(head).encode())
    h.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
    return h.hexdigest()


def digest_of(job: WorkerJob, device: str) -> str:
    g, q = job.gallery, job.query
    if g is None or job.labels is None:
        raise RuntimeError(f"job {job.job_id} has no gallery snapshot")
    digest = job_digest(job.kind, g.shape[0], g.shape[1], job.threshold, job.labels, device,
                        int(q.shape[0]) if q.ndim == 2 else 0, job.row_counts)
    sealed = getattr(job.sealed, "digest", None)  # sealed mode: the same model and rotation at both parties
    return digest if sealed is None else f"{digest}:{sealed}"



def coalescible(first: WorkerJob, other: WorkerJob, verify: bool = True) -> bool:
    """Two queued jobs may run as one batched MPC job: single-query identify (or a shard's identify-best) jobs on
    the very same resident gallery snapshot (the same array object), threshold and labels; or, with ``verify``,
    single-query verify jobs with the same threshold and row width (their rows are stacked)."""
    if first.kind != other.kind or first.kind not in ("identify", "identify-best", "verify"):
        return False
    if first.sealed is not None or other.sealed is not None:  # its query exists only once the job runs
        return False
    if np.ndim(first.query) != 1 or np.ndim(other.query) != 1 or other.threshold != first.threshold:
        return False
    if first.kind == "verify":
        return (verify and first.gallery is not None and other.gallery is not None
                and first.row_counts is None and other.row_counts is None
                and first.gallery.shape[1:] == other.gallery.shape[1:])
    if other.gallery is not first.gallery:
        return False
    if other.labels is first.labels:
        return True
    return other.labels is not None and first.labels is not None and bool(np.array_equal(other.labels, first.labels))


def combined_job(group: list[WorkerJob]) -> WorkerJob:
    """One job for a group of coalescible jobs: their queries stacked as a batch, answered per member."""
    if len(group) == 1:
        return group[0]
    query = np.stack([np.asarray(x.query) for x in group])
    members = tuple(x.job_id for x in group)
    if group[0].kind != "verify":
        return replace(group[0], query=query, members=members)
    galleries = [np.asarray(x.gallery) for x in group]
    labels = [np.zeros(0, np.int64) if x.labels is None else np.asarray(x.labels, dtype=np.int64) for x in group]
    return replace(group[0], query=query, members=members, gallery=np.concatenate(galleries),
                   labels=np.concatenate(labels), resident=False, row_counts=tuple(int(g.shape[0]) for g in galleries))


def split_output(job: WorkerJob, share: Output) -> list[tuple[str, Output]]:
    """(job id, its output share) for each job a (possibly coalesced) job answers. A coalesced identify-best batch
    answers [Q scores, Q labels]; each member gets its [score, label]."""
    if job.members is None:
        return [(job.job_id, share)]
    if not isinstance(share, list):
        raise RuntimeError("a coalesced job answers one share per member")
    q = len(job.members)
    flat = cast(list[int], share)  # a batch's output is flat: Q shares, or Q scores then Q labels
    if job.kind == "identify-best":
        return [(job_id, [flat[i], flat[q + i]]) for i, job_id in enumerate(job.members)]
    return [(job_id, value) for job_id, value in zip(job.members, flat)]
