"""The gateway's only door to the two parties (``PartyPair``): two-phase operations and match jobs.

Every body it sends or reads is a model of the party's wire contract (``secure/party/api.py``), the same models the
party validates with.

Store / delete are two-phase. ``store`` / ``delete_prepare`` run *prepare* at both parties concurrently and return
True only if both prepared; the gateway records its decision durably in its own database, then tells each party
(``decide_at``; ``commit`` / ``abort`` tell both at once). Both decisions are idempotent at the party, so the
gateway's reconcile loop (``app/services/operations.py``) re-sends a recorded decision until each party has
acknowledged it. The link to each party (``partylink.py``) sends a call that is idempotent at the party once more
when its pooled connection drops before the answer; a match job never (its 503 goes to the caller).

Match jobs (``verify`` / ``identify`` / ``identify_many``) split the fixed-point query into two shares, send one to
each party, and reconstruct only the revealed output (one bit; for identify, the matched template_seq when the bit
is 1). A share pair is never kept beyond the call that split it. Every call carries the id of the request being
handled (``X-Request-ID``, ``common/logs.py``), so the parties' log lines name it.

Errors: ``PartiesUnavailable`` (timeouts, connection errors, 5xx, and 401/403 — a party rejecting the internal
token is a deployment fault: the gateway answers 503), ``PartiesOutOfSync`` (a party is behind the requested
snapshot, or the parties disagree on it: the gateway reconciles and retries once), ``PartiesError`` (anything else).
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel

from common.settings import MAX_QUERY_BATCH
from secure.party.api import (
    CheckIn,
    CheckOut,
    GalleryIn,
    MatchIn,
    MatchKind,
    MatchOut,
    PrepareIn,
    SealedIn,
    SealedPrepareIn,
)
from secure.party.replies import (
    CANCELLED,
    PartiesError,
    PartiesOutOfSync,
    PartiesUnavailable,
    Reply,
    raise_unavailable,
)
from secure.pacing import JobPacer
from secure.partylink import POOL_IDLE_S, make_client, send, send_job, tls_context
from secure.precheck import PrecheckMode, PrecheckPolicy
from secure.ranges import check_unit_fixed
from secure.sharing import reconstruct_int, split, to_b64
from secure.thresholds import GalleryPolicy

__all__ = ["PartiesError", "PartiesOutOfSync", "PartiesUnavailable", "PartyPair"]

C = TypeVar("C", bound=CheckOut)


def _dump(body: BaseModel) -> dict[str, Any]:
    return body.model_dump(mode="json", exclude_none=True)


class PartyPair:
    """Async client of party 0 and party 1 (``httpx.AsyncClient``; use ``async with`` or ``aclose``).

    ``tls_verify``: True (system CAs), False, a CA bundle path, or an ``ssl.SSLContext``;
    ``client_cert``: a PEM path or (cert, key) paths for mutual TLS.
    ``precheck``: before which match jobs to ask both parties (no shares sent) whether they can serve the snapshot
    and on which rows (``precheck.py``: "always" = True, "after-refusal", or False = never; or a ``PrecheckPolicy``).
    ``internal_token``: one token per link, ``(token of party 0, token of party 1)``; a single string is
    the same token on both links (tests only: production parties refuse to share one).
    Thresholds: a match job carries none. Before a gallery's first job from this process, the gallery is
    registered at both parties with the caller's threshold (``register_gallery``); a party that recorded
    another threshold refuses (409), and every later job runs at the recorded one.
    ``pool_idle_s``: how long an idle pooled connection may be reused, well below the party's keep-alive timeout
    (``partylink.py``; tests scale both down).
    ``pacer``: the gateway's admission control for MPC jobs (``pacing.py``); None sends every job at once.
    """

    def __init__(self, party_urls: tuple[str, str] | list[str], internal_token: str | tuple[str, str] | list[str],
                 timeout_s: float = 15.0, *,
                 tls_verify: Any = True, client_cert: Any = None, transport_retries: int = 1,
                 precheck: bool | PrecheckMode | PrecheckPolicy = True, pool_idle_s: float = POOL_IDLE_S,
                 pacer: JobPacer | None = None) -> None:
        if len(party_urls) != 2:
            raise ValueError("exactly two party URLs")
        self.party_urls = tuple(u.rstrip("/") for u in party_urls)
        self.timeout_s = float(timeout_s)
        self.precheck = precheck if isinstance(precheck, PrecheckPolicy) else PrecheckPolicy(precheck)
        self.pacer = pacer
        tokens = (internal_token, internal_token) if isinstance(internal_token, str) else tuple(internal_token)
        if len(tokens) != 2 or not all(tokens):
            raise ValueError("one non-empty token per party")
        self._registered: dict[str, GalleryPolicy] = {}  # galleries both parties have recorded, with their policy
        verify = tls_context(tls_verify, client_cert)
        self._clients = [make_client(url, token, self.timeout_s, verify, transport_retries, pool_idle_s)
                         for url, token in zip(self.party_urls, tokens)]

    async def __aenter__(self) -> PartyPair:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await asyncio.gather(*(c.aclose() for c in self._clients))

    # -- transport ------------------------------------------------------------------------------------------
    async def _call(self, rank: int, method: str, path: str, json: Any = None, timeout: float | None = None, *,
                    idempotent: bool) -> Reply:
        """One request to one party (``partylink.send``: ``idempotent`` says whether a dropped one is resent)."""
        return await send(self._clients[rank], rank, method, path, json, timeout or self.timeout_s,
                          idempotent=idempotent)

    async def _both(self, method: str, path: str, body: BaseModel | tuple[BaseModel, BaseModel] | None = None,
                    timeout: float | None = None) -> tuple[Reply, Reply]:
        """The same call at both parties, concurrently; a pair of bodies gives each party its own. Every caller's
        call is idempotent at the party (``partylink.send``); the match job goes through ``_match_both``."""
        bodies = body if isinstance(body, tuple) else (body, body)
        json = [None if b is None else _dump(b) for b in bodies]
        r0, r1 = await asyncio.gather(self._call(0, method, path, json[0], timeout, idempotent=True),
                                      self._call(1, method, path, json[1], timeout, idempotent=True))
        return r0, r1

    # -- two-phase operations ---------------------------------------------------------------------------------
    async def store(self, seq: int, template_seq: int, gallery: str, template_fixed: np.ndarray) -> bool:
        """Prepare storing a fixed-point template (int64 [d]) in ``gallery`` as two shares. True only if both
        prepared; False if a party refused (e.g. 409: seq or template already used); raises PartiesUnavailable if
        a party could not answer."""
        template = np.asarray(template_fixed)
        if template.ndim != 1 or template.size == 0 or template.dtype != np.int64:
            raise ValueError("template_fixed must be a non-empty 1-d int64 array")
        check_unit_fixed(template)  # scores stay within [-1, 1], where the comparison is exact
        s0, s1 = split(template)
        bodies = tuple(PrepareIn(seq=seq, kind="store", gallery=gallery, template_seq=template_seq,
                                 share=to_b64(s)) for s in (s0, s1))
        del s0, s1
        replies = await self._both("POST", "/internal/ops/prepare", (bodies[0], bodies[1]))
        del bodies
        return self._prepared(seq, replies)

    async def store_sealed(self, seq: int, template_seq: int, gallery: str, job_id: str,
                           sealed: tuple[SealedIn, SealedIn]) -> bool:
        """Sealed mode: prepare storing the template both parties compute under MPC from their own sealed feature
        share (each party gets only its own envelope). True only if both prepared; like ``store`` otherwise."""
        await self.check_sealed(sealed)
        bodies = [_dump(SealedPrepareIn(seq=seq, gallery=gallery, template_seq=template_seq, job_id=job_id,
                                        sealed=part, timeout_s=self.timeout_s)) for part in sealed]
        replies = await self._match_both(bodies, self.timeout_s + 5.0, "/internal/sealed/prepare")
        return self._prepared(seq, (replies[0], replies[1]))

    async def check_sealed(self, sealed: tuple[SealedIn, SealedIn]) -> None:
        """Ask both parties whether they can use their sealed input before any MPC starts (a party that refused
        alone would leave its peer waiting in the MPC): PartiesError 422 when one cannot (the caller's input)."""
        replies = await self._both("POST", "/internal/sealed/check", sealed)
        raise_unavailable(replies, "sealed check")
        for r in sorted(replies, key=lambda reply: reply.status != 422):
            if not r.ok:
                raise PartiesError(f"party {r.rank} refused its sealed input ({r.status} {r.slug})", status=r.status,
                                   problems=[reply.problem for reply in replies])

    async def match_sealed(self, kind: MatchKind, job_id: str, gallery: str, upto_seq: int,
                           sealed: tuple[SealedIn, SealedIn], threshold: GalleryPolicy | float,
                           template_seqs: list[int] | None, *, expected_committed: int | None = None) -> int:
        """Sealed mode's verify / identify: one job whose query the parties compute from their sealed shares; the
        reconstructed output (verify: 0 or 1; identify: the matched template_seq or 0)."""
        check = CheckIn(kind=kind, gallery=gallery, upto_seq=upto_seq, expected_committed=expected_committed,
                        template_seqs=template_seqs)
        await self.check_sealed(sealed)
        b0, b1 = await self._run_job(check, job_id, threshold, ({"sealed": sealed[0]}, {"sealed": sealed[1]}))
        if b0.share is None or b1.share is None:
            raise PartiesError("a party returned no output share")
        out = reconstruct_int(int(b0.share), int(b1.share))
        if out < 0 or (kind == "verify" and out > 1):
            raise PartiesError(f"the MPC returned an invalid {kind} output")
        return out

    async def delete_prepare(self, seq: int, template_seqs: Iterable[int], gallery: str | None = None) -> bool:
        """Prepare deleting (erasing) the given templates in one operation. True only if both prepared.

        Templates unknown to a party are ignored there; a template whose store is still prepared is a 409
        (False). Raises PartiesUnavailable like ``store``. On commit each party erases its share bytes.
        """
        targets = sorted({int(t) for t in template_seqs})
        if not targets:
            raise ValueError("nothing to delete")
        body = PrepareIn(seq=seq, kind="delete", gallery=gallery, template_seqs=targets)
        return self._prepared(seq, await self._both("POST", "/internal/ops/prepare", body))

    def _prepared(self, seq: int, replies: tuple[Reply, Reply]) -> bool:
        """True if both prepared; False if one refused (4xx); PartiesUnavailable if one could not answer.

        Whatever the outcome, the gateway records a decision and sends it (abort unless True).
        """
        if all(r.state in ("prepared", "committed") for r in replies):
            return True
        raise_unavailable(replies, f"prepare of op {seq}")
        return False

    async def commit(self, seq: int) -> tuple[bool, bool]:
        """Send the commit decision for ``seq``; per-party acks (True once the party has it committed)."""
        r0, r1 = await self._both("POST", f"/internal/ops/{seq}/commit")
        return (r0.state == "committed", r1.state == "committed")

    async def abort(self, seq: int) -> tuple[bool, bool]:
        """Send the abort decision for ``seq`` (a party that never heard of it records it as aborted)."""
        r0, r1 = await self._both("POST", f"/internal/ops/{seq}/abort")
        return (r0.state == "aborted", r1.state == "aborted")

    async def decide_at(self, rank: int, seq: int, commit: bool) -> bool:
        """Send one party the decision for ``seq``; True once that party acknowledges it. Never raises."""
        reply = await self._call(rank, "POST", f"/internal/ops/{seq}/{'commit' if commit else 'abort'}",
                                 idempotent=True)
        return reply.state == ("committed" if commit else "aborted")

    async def op_states(self, seq: int) -> tuple[str | None, str | None]:
        """Each party's state for ``seq`` (None: unknown there). Raises PartiesUnavailable."""
        replies = await self._both("GET", f"/internal/ops/{seq}")
        raise_unavailable(replies)
        return (replies[0].state, replies[1].state)

    async def state(self) -> list[dict[str, Any]]:
        """Both parties' /internal/state (``api.StateOut``: applied_through, pending, committed_count, ...)."""
        replies = await self._both("GET", "/internal/state")
        raise_unavailable(replies)
        for r in replies:
            if not r.ok:
                raise PartiesError(f"party {r.rank} state failed ({r.status})", status=r.status)
        return [r.body for r in replies]

    async def probe(self, timeout: float | None = None) -> list[dict[str, Any] | None]:
        """Each party's /internal/state, or None for a party that did not answer it (health per party:
        readiness and the gateway's metrics; ``state`` raises as soon as either party is down)."""
        replies = await self._both("GET", "/internal/state", timeout=timeout)
        return [r.body if r.ok and isinstance(r.body, dict) else None for r in replies]

    async def sealed_keys(self) -> list[dict[str, Any]]:
        """Both parties' sealed-mode public keys (``api.SealedKeyOut``), party 0's first."""
        replies = await self._both("GET", "/internal/sealed/key")
        raise_unavailable(replies)
        for r in replies:
            if not r.ok or not isinstance(r.body, dict) or r.body.get("rank") != r.rank:
                raise PartiesError(f"party {r.rank} sealed key failed ({r.status})", status=r.status)
        return [r.body for r in replies]

    # -- match jobs ------------------------------------------------------------------------------------------
    @staticmethod
    def _query(query_fixed: np.ndarray) -> np.ndarray:
        query = np.asarray(query_fixed)
        if query.ndim != 1 or query.size == 0 or query.dtype != np.int64:
            raise ValueError("query_fixed must be a non-empty 1-d int64 array")
        return check_unit_fixed(query)  # a scaled query would move the fixed threshold (see secure/ranges.py)

    async def register_gallery(self, gallery: str, threshold: GalleryPolicy | float) -> None:
        """Record the gallery's thresholds (a ``GalleryPolicy``, or one threshold for both kinds) at both parties
        (once; idempotent for the same policy).

        Raises ValueError for an out-of-range threshold, PartiesError (409) if a party holds another policy,
        PartiesUnavailable like the other calls.
        """
        value = GalleryPolicy.of(threshold)
        if self._registered.get(gallery) == value:
            return
        body = GalleryIn(gallery=gallery, threshold=value.verify, identify_thresholds=value.schedule_json() or None)
        replies = await self._both("POST", "/internal/galleries", body)
        raise_unavailable(replies, f"registering gallery {gallery}")
        refused = [r for r in replies if not r.ok]
        if refused:
            raise PartiesError(f"party {refused[0].rank} refused gallery {gallery!r} ({refused[0].slug})",
                               status=refused[0].status, problems=[r.problem for r in replies])
        self._registered[gallery] = value

    async def _run_job(self, check: CheckIn, job_id: str, threshold: GalleryPolicy | float,
                       queries: tuple[dict[str, Any], dict[str, Any]]) -> tuple[MatchOut, MatchOut]:
        """Precheck, then one match job at both parties; ``queries[rank]`` holds that party's query fields."""
        await self.register_gallery(check.gallery, threshold)
        try:
            if self.precheck.wanted(check.gallery):
                self.precheck.count_sent()
                self._check_sync(check.upto_seq, await self._both("POST", "/internal/match/check", check), CheckOut)
            # no threshold: the parties use the gallery's recorded one
            job = MatchIn(**check.model_dump(), job_id=job_id, timeout_s=self.timeout_s)
            bodies = [_dump(job.model_copy(update=fields)) for fields in queries]
            del queries  # the caller's tuple held the only other reference to the shares
            replies = await self._match_both(bodies, timeout=self.timeout_s + 5.0)
            del bodies
            answers = self._check_sync(check.upto_seq, replies, MatchOut)
        except BaseException:  # refused, unavailable, cancelled
            self.precheck.failed(check.gallery)
            raise
        self.precheck.ran(check.gallery)
        return answers

    def _check_sync(self, upto_seq: int, replies: Iterable[Reply], model: type[C]) -> tuple[C, C]:
        """Raise for unavailable / out-of-sync / refused replies; else both answers as ``model`` (a precheck's
        ``CheckOut`` or a job's ``MatchOut``), after checking that both parties hold the same gallery."""
        replies = list(replies)
        raise_unavailable(replies)
        problems = [r.problem for r in replies]
        sync = [r for r in replies if r.status == 409]
        if any(r.slug == "gallery-unregistered" for r in sync):
            self._registered.clear()  # a party lost its record (fresh database): register again on the retry
        if sync:
            pending = {r.rank: list(r.body.get("pending", [])) if isinstance(r.body, dict) else [] for r in sync}
            slugs = ",".join(f"{r.rank}:{r.slug}" for r in sync)
            raise PartiesOutOfSync(f"parties not ready for snapshot {upto_seq} ({slugs})", status=409,
                                   pending=pending, problems=problems)
        for r in sorted(replies, key=lambda reply: reply.status == CANCELLED):  # a real refusal explains best
            if not r.ok:
                raise PartiesError(f"party {r.rank} refused the match job ({r.status} {r.slug})", status=r.status,
                                   problems=problems)
        b0, b1 = replies[0].parsed(model), replies[1].parsed(model)
        if b0.n != b1.n or b0.labels_digest != b1.labels_digest:
            raise PartiesOutOfSync(f"the parties' galleries differ at snapshot {upto_seq}", status=409,
                                   problems=problems)
        return b0, b1

    async def _match_both(self, bodies: list[dict[str, Any]], timeout: float,
                          path: str = "/internal/match") -> list[Reply]:
        """Both calls of an MPC job, paced (``pacing.py``) and never resent (``partylink.send_job``)."""
        async with self.pacer.slot() if self.pacer else contextlib.nullcontext():
            return await send_job(self._clients, bodies, timeout, path)

    async def _match_one(self, kind: MatchKind, job_id: str, gallery: str, upto_seq: int, query_fixed: np.ndarray,
                         threshold: GalleryPolicy | float, template_seqs: list[int] | None,
                         expected_committed: int | None) -> int:
        """One query, one job: the reconstructed output."""
        check = CheckIn(kind=kind, gallery=gallery, upto_seq=upto_seq, expected_committed=expected_committed,
                        template_seqs=template_seqs)
        q0, q1 = split(self._query(query_fixed))
        b0, b1 = await self._run_job(check, job_id, threshold,
                                     ({"query_share": to_b64(q0)}, {"query_share": to_b64(q1)}))
        if b0.share is None or b1.share is None:
            raise PartiesError("a party returned no output share")
        return reconstruct_int(int(b0.share), int(b1.share))

    async def verify(self, job_id: str, gallery: str, upto_seq: int, query_fixed: np.ndarray,
                     template_seqs: Iterable[int], threshold: GalleryPolicy | float, *,
                     expected_committed: int | None = None) -> bool:
        """1:1 — does the query match any of the claimed subject's templates (visible at upto_seq)?"""
        seqs = sorted({int(t) for t in template_seqs})
        if not seqs:
            return False
        out = await self._match_one("verify", job_id, gallery, upto_seq, query_fixed, threshold, seqs,
                                    expected_committed)
        if out not in (0, 1):
            raise PartiesError("the MPC returned an invalid verify output")
        return out == 1

    async def identify(self, job_id: str, gallery: str, upto_seq: int, query_fixed: np.ndarray,
                       threshold: GalleryPolicy | float, *, expected_committed: int | None = None) -> int | None:
        """1:N — the matched template_seq, or None."""
        out = await self._match_one("identify", job_id, gallery, upto_seq, query_fixed, threshold, None,
                                    expected_committed)
        if out < 0:
            raise PartiesError("the MPC returned an invalid identify output")
        return out or None

    async def identify_many(self, job_id: str, gallery: str, upto_seq: int, queries_fixed: list[np.ndarray],
                            threshold: GalleryPolicy | float, *,
                            expected_committed: int | None = None) -> list[int | None]:
        """1:N for several queries in ONE match job (one MPC run): per query, the matched template_seq or None.

        Concurrent identify requests on the same snapshot share the MPC's fixed costs (rounds, the knockout
        tournament) this way. Each query is split into fresh shares; errors are those of ``identify`` and
        concern the whole batch.
        """
        queries = [self._query(q) for q in queries_fixed]
        if not queries:
            return []
        if len(queries) > MAX_QUERY_BATCH:
            raise ValueError(f"at most {MAX_QUERY_BATCH} queries in one identify job")
        check = CheckIn(kind="identify", gallery=gallery, upto_seq=upto_seq, expected_committed=expected_committed)
        pairs = [split(q) for q in queries]
        fields = ({"query_shares": [to_b64(p[0]) for p in pairs]}, {"query_shares": [to_b64(p[1]) for p in pairs]})
        del pairs
        b0, b1 = await self._run_job(check, job_id, threshold, fields)
        s0, s1 = b0.shares, b1.shares
        if s0 is None or s1 is None or not len(s0) == len(s1) == len(queries):
            raise PartiesError("a party returned no per-query shares for the identify batch")
        outs = [reconstruct_int(int(a), int(b)) for a, b in zip(s0, s1)]
        if any(out < 0 for out in outs):
            raise PartiesError("the MPC returned an invalid identify output")
        return [out or None for out in outs]
