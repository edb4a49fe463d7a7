"""A party's match jobs: from a validated ``MatchIn`` to this party's share of the output.

Why a module of its own: the rules that keep a caller from choosing what the parties reveal live here, in one
place. The threshold is the gallery's recorded one (``thresholds.py``), never the request's; every job spends the
link's budget (``ratelimit.py``) and is audited (``audit.py``); the rows are the snapshot the op log serves to both
parties alike. Shares and queries are never logged.
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import numpy as np
from starlette.concurrency import run_in_threadpool

from common.problems import Problem as PartyProblem
from secure.mpc.engine import MatchJob, MpcUnavailable
from secure.mpc.protocols.sealed_model import SealedQuery
from secure.party.api import CheckIn, CheckOut, MatchIn, MatchOut, SealedIn, output_text
from secure.party.audit import MatchAudit
from secure.party.gallery import SnapshotTooOld
from secure.party.metrics import PartyMetrics
from secure.party.oplog import OpError, OpLog
from secure.party.ratelimit import TokenBucket
from secure.party.settings import PartySettings
from secure.party.thresholds import Thresholds
from secure.sharing import from_b64
from secure.thresholds import GalleryPolicy

log = logging.getLogger("privface.party")
T = TypeVar("T")


class JobRef(Protocol):
    """What the budget, the audit and the run need to name a job (a ``MatchIn``, or a sealed enrollment's)."""

    @property
    def job_id(self) -> str: ...

    @property
    def kind(self) -> str: ...

    @property
    def gallery(self) -> str: ...

    @property
    def timeout_s(self) -> float | None: ...


class SealedOpener(Protocol):
    """Sealed mode's opening of this party's envelope (``secure/party/sealed.py``)."""

    def query(self, body: SealedIn) -> SealedQuery: ...

    def use(self, body: SealedIn, operation: str) -> None: ...


class MatchEngine(Protocol):
    """What the party needs of its MPC engine (``MpcEngine``, ``ShardedEngine``, or a test stand-in)."""

    def submit(self, job: MatchJob, timeout: float) -> Any: ...

    def status(self) -> dict[str, Any]: ...


def labels_digest(labels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(labels, dtype="<i8").tobytes()).hexdigest()


def op_problem(exc: OpError) -> PartyProblem:
    titles = {404: "Unknown operation", 409: "Operation conflict", 422: "Invalid operation"}
    return PartyProblem(exc.status, exc.slug, titles.get(exc.status, "Operation error"), exc.detail, **exc.extra)


def _invalid(detail: str) -> PartyProblem:
    return PartyProblem(422, "validation-error", "The request is not valid", detail)


class MatchDesk:
    """Answers ``/internal/match/check`` and ``/internal/match`` for one party."""

    def __init__(self, settings: PartySettings, engine: MatchEngine, oplog: OpLog, thresholds: Thresholds,
                 audit: MatchAudit, metrics: PartyMetrics, sealed: SealedOpener | None = None) -> None:
        self.settings, self.engine, self.oplog = settings, engine, oplog
        self.sealed = sealed
        self.thresholds, self.audit, self.metrics = thresholds, audit, metrics
        self.bucket = TokenBucket(settings.match_rate_per_s, settings.match_burst)
        self.jobs_run = 0  # MPC jobs this process ran (a batch counts once): shows the gateway's batching

    # -- the rows ---------------------------------------------------------------------------------------------
    async def _rows(self, body: CheckIn) -> tuple[np.ndarray, np.ndarray, str]:
        """The job's snapshot (shares, labels, digest of the labels), off the event loop: a filtered snapshot of
        a large gallery is a big copy."""
        def take() -> tuple[np.ndarray, np.ndarray, str]:
            shares, labels = self.oplog.match_rows(body.gallery, body.upto_seq, body.expected_committed,
                                                   body.template_seqs if body.kind == "verify" else None)
            return shares, labels, labels_digest(labels)

        return await self._snapshot_call(take)

    @staticmethod
    async def _snapshot_call(fn: Callable[[], T]) -> T:
        try:
            return await run_in_threadpool(fn)
        except OpError as exc:
            raise op_problem(exc) from None
        except SnapshotTooOld as exc:
            raise PartyProblem(409, "snapshot-too-old", "Snapshot too old", str(exc)) from None

    async def check(self, body: CheckIn) -> CheckOut:
        """Would a match job on this snapshot run here, and on which rows? (No share is involved.)"""
        _, labels, digest = await self._rows(body)
        return CheckOut(n=int(labels.shape[0]), labels_digest=digest)

    # -- the threshold and the budget ----------------------------------------------------------------------------
    def _policy(self, body: MatchIn) -> GalleryPolicy:
        """The gallery's recorded thresholds (never the request's)."""
        recorded = self.thresholds.get(body.gallery)
        if recorded is None:
            raise PartyProblem(409, "gallery-unregistered", "Gallery not registered",
                               "register the gallery (POST /internal/galleries) before matching on it")
        return recorded

    @staticmethod
    def _threshold(body: MatchIn, policy: GalleryPolicy, n: int) -> float:
        """The threshold for this job (identify: by the gallery's size n); a request may only repeat it."""
        threshold = policy.threshold(body.kind, n)
        if body.threshold is not None and body.threshold != threshold:
            raise PartyProblem(409, "threshold-mismatch", "Threshold is not the gallery's",
                               "a match job runs at the gallery's recorded threshold only")
        return threshold

    async def spend_budget(self, body: JobRef) -> None:
        wait = self.bucket.take()
        if wait > 0:
            await self.audit_job(body, 0, 0, 429)
            raise PartyProblem(429, "rate-limited", "Too many match jobs",
                               f"this link allows {self.settings.match_rate_per_s:g} match jobs per second",
                               headers={"Retry-After": TokenBucket.retry_after(wait)})

    async def audit_job(self, body: JobRef, rows: int, queries: int, status: int) -> None:
        await run_in_threadpool(self.audit.record, body.job_id, body.kind, body.gallery, rows, queries, status)

    # -- the job ------------------------------------------------------------------------------------------------
    async def match(self, body: MatchIn) -> MatchOut:
        """Answer a match job, counted and timed by kind and status (refusals included)."""
        start, status = time.perf_counter(), 500
        try:
            out = await self._answer(body)
            status = 200
            return out
        except PartyProblem as exc:
            status = exc.status
            raise
        finally:
            self.metrics.observe_job(body.kind, status, time.perf_counter() - start)

    @staticmethod
    def _check_shape(body: MatchIn) -> None:
        if body.threshold is not None and not math.isfinite(body.threshold):
            raise _invalid("threshold must be finite")
        if body.kind == "verify" and not body.template_seqs:
            raise _invalid("verify names template_seqs")
        if [body.query_share, body.query_shares, body.sealed].count(None) != 2:
            raise _invalid("give exactly one of query_share, query_shares and sealed")
        if body.sealed is not None and body.kind not in ("verify", "identify"):
            raise _invalid("a sealed query is for verify and identify")
        if body.query_shares is not None and body.kind != "identify":
            raise _invalid("query_shares (a batch) is for identify only")

    async def _answer(self, body: MatchIn) -> MatchOut:
        self._check_shape(body)
        await self.spend_budget(body)
        policy = self._policy(body)
        shares, labels, digest = await self._rows(body)
        n = int(labels.shape[0])
        threshold = self._threshold(body, policy, n)
        batch = body.query_shares
        queries = 1 if batch is None else len(batch)
        if n == 0:  # nothing to match: both parties (in sync) answer 0 without running the MPC
            await self.audit_job(body, 0, queries, 200)
            return self._out(body, [0] * queries, 0, digest)
        dim = int(shares.shape[1])
        sealed = self._sealed(body.sealed, dim, body.kind) if body.sealed is not None else None
        query = self._query(body, dim) if sealed is None else np.zeros(dim, dtype=np.int64)
        job = MatchJob(job_id=body.job_id, kind=body.kind, query_share=query, gallery_share=shares, labels=labels,
                       gallery_id=f"{body.gallery}:{digest}" if body.kind == "identify" else None,
                       threshold=threshold, sealed=sealed)  # a template's share never changes under its label
        status, result = await self.run(body, job)
        await self.audit_job(body, n, queries, status)
        if isinstance(result, PartyProblem):
            raise result
        self.jobs_run += 1
        outs = [result] if batch is None else list(result)
        if len(outs) != queries:
            log.error("match job %s returned %d shares for %d queries", body.job_id, len(outs), queries)
            raise PartyProblem(500, "mpc-failed", "Secure computation failed", "wrong number of outputs")
        return self._out(body, outs, n, digest)

    @staticmethod
    def _query(body: MatchIn, dim: int) -> np.ndarray:
        """This party's query share [d], or the batch [Q, d] (one MPC job, one tournament, for all queries)."""
        try:
            if body.query_shares is None:
                return from_b64(body.query_share or "", dim=dim)
            return np.stack([from_b64(text, dim=dim) for text in body.query_shares])
        except ValueError as exc:
            field = "query_share" if body.query_shares is None else "query_shares"
            raise _invalid(f"{field}: {exc}") from None

    def _sealed(self, body: SealedIn, dim: int, kind: str) -> SealedQuery:
        """This party's sealed input (its envelope opened here), for a gallery of templates of size ``dim``; its
        nonce is spent on this ``kind`` of job (a replay or a payload sealed for another operation is refused)."""
        if self.sealed is None:
            raise PartyProblem(409, "sealed-disabled", "Sealed mode not served", "this party serves no sealed model")
        sealed = self.sealed.query(body)
        if sealed.dim != dim:
            raise _invalid(f"the sealed model's templates have d={sealed.dim}, the gallery's d={dim}")
        self.sealed.use(body, kind)
        return sealed

    @staticmethod
    def _out(body: MatchIn, outs: list[Any], n: int, digest: str) -> MatchOut:
        texts = [output_text(v) for v in outs]
        if body.query_shares is None:
            return MatchOut(job_id=body.job_id, share=texts[0], n=n, labels_digest=digest)
        return MatchOut(job_id=body.job_id, shares=texts, n=n, labels_digest=digest)

    async def run(self, body: JobRef, job: MatchJob) -> tuple[int, Any]:
        """Run the MPC job: (200, output) or (status, PartyProblem) — the caller audits, then answers."""
        timeout = min(body.timeout_s or self.settings.match_timeout_s, self.settings.match_timeout_s)
        try:
            out = await run_in_threadpool(self.engine.submit, job, timeout)
        except (MpcUnavailable, TimeoutError) as exc:
            log.warning("match job %s unavailable: %s", body.job_id, type(exc).__name__)
            return 503, PartyProblem(503, "mpc-unavailable", "Secure computation unavailable",
                                     f"the MPC engine could not run the job ({type(exc).__name__})",
                                     headers={"Retry-After": "2"})
        except Exception as exc:  # noqa: BLE001
            log.error("match job %s failed: %s", body.job_id, type(exc).__name__)
            return 500, PartyProblem(500, "mpc-failed", "Secure computation failed", type(exc).__name__)
        job_stats = getattr(self.engine, "job_stats", None)  # test stand-ins keep no stats
        self.metrics.observe_mpc(body.kind, job_stats(body.job_id) if job_stats is not None else None)
        return 200, out
