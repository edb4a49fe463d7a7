"""A party's internal API (FastAPI): two-phase ops from the gateway, state, and MPC match jobs.

Every route but /healthz (``/metrics`` included) requires ``Authorization: Bearer <this link's token>`` (constant-time compare;
each party has its own token, see ``settings.py``) and, when a pin is configured, the gateway's own client
certificate (``tlspin.py``). A match job's threshold is the gallery's, recorded once at registration
(``thresholds.py``), never the request's; match jobs are rate-limited (``ratelimit.py``) and audited
(``audit.py``). Shares and queries are never logged. ``run_party(settings)`` checks the deployment
(``check_deployment``), migrates the database, rebuilds the gallery, starts the MPC engine and serves
(HTTPS when a certificate is configured; mTLS when a CA is).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import logging
import math
import time
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Path, Request, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from common.problems import Problem as PartyProblem
from common.problems import install_problem_handlers, problem_response
from common.settings import MAX_QUERY_BATCH
from secure.party.audit import MatchAudit
from secure.party.db import make_party_engine, migrate_party_db
from secure.party.gallery import Gallery, SnapshotTooOld
from secure.party.metrics import PartyMetrics
from secure.party.oplog import OpError, OpLog, OpSpec
from secure.party.ratelimit import TokenBucket
from secure.party.settings import PartySettings
from secure.party.thresholds import ThresholdConflict, Thresholds
from secure.thresholds import GalleryPolicy
from secure.party.tlspin import PeerCertH11Protocol, normalize_pin
from secure.party.traffic import install_traffic_log
from secure.sharing import from_b64

log = logging.getLogger("privface.party")
JOB_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"


def _mpc_types() -> tuple[type, type]:
    from secure.mpc.engine import MatchJob, MpcUnavailable

    return MatchJob, MpcUnavailable


class PrepareIn(BaseModel):
    seq: int = Field(..., gt=0)
    kind: Literal["store", "delete"]
    model_version: str | None = Field(None, max_length=200)
    template_seq: int | None = Field(None, gt=0)
    template_seqs: list[int] = Field(default_factory=list, max_length=10_000)
    share: str | None = Field(None, description="store: base64 of this party's int64 LE share", repr=False)


class OpOut(BaseModel):
    seq: int
    state: str | None


class MatchIn(BaseModel):
    job_id: str = Field(..., pattern=JOB_ID_PATTERN)
    kind: Literal["verify", "identify"]
    model_version: str = Field(..., min_length=1, max_length=200)
    upto_seq: int = Field(..., ge=0)
    expected_committed: int | None = Field(None, ge=0, description="gateway's count of committed ops <= upto_seq")
    query_share: str | None = Field(None, repr=False)
    query_shares: list[str] | None = Field(None, min_length=1, max_length=MAX_QUERY_BATCH, repr=False,
                                           description="identify only: a batch of queries, one MPC job")
    template_seqs: list[int] | None = Field(None, max_length=10_000)
    threshold: float | None = Field(None, description="optional assertion: refused unless it equals the gallery's "
                                                      "recorded threshold (the party never takes it from here)")
    timeout_s: float | None = Field(None, gt=0)


class GalleryIn(BaseModel):
    model_version: str = Field(..., min_length=1, max_length=200)
    threshold: float = Field(..., description="verify (1:1) threshold")
    identify_thresholds: list[tuple[int, float]] | None = Field(
        None, max_length=32, description="identify schedule [[max gallery size, threshold], ...] "
                                         "(secure/thresholds.py); absent: identify uses the verify threshold")


class GalleryOut(BaseModel):
    model_version: str
    threshold: float
    identify_thresholds: list[tuple[int, float]] | None = None


class CheckIn(BaseModel):
    kind: Literal["verify", "identify"]
    model_version: str = Field(..., min_length=1, max_length=200)
    upto_seq: int = Field(..., ge=0)
    expected_committed: int | None = Field(None, ge=0)
    template_seqs: list[int] | None = Field(None, max_length=10_000)


class CheckOut(BaseModel):
    n: int
    labels_digest: str


class MatchOut(BaseModel):
    job_id: str
    share: str | None = None  # str(int): this party's additive share of the output, mod 2**64 (one query)
    shares: list[str] | None = None  # the same per query, in order, when the job carried query_shares
    n: int  # rows in the job's gallery
    labels_digest: str  # sha256 of the gallery's labels (public), so the gateway can check both parties agree


def labels_digest(labels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(labels, dtype="<i8").tobytes()).hexdigest()


def _op_problem(exc: OpError) -> PartyProblem:
    titles = {404: "Unknown operation", 409: "Operation conflict", 422: "Invalid operation"}
    return PartyProblem(exc.status, exc.slug, titles.get(exc.status, "Operation error"), exc.detail, **exc.extra)


def create_party_app(settings: PartySettings, engine: Any, *, oplog: OpLog | None = None) -> FastAPI:
    """The party app. ``engine``: a started-or-startable ``secure.mpc.engine.MpcEngine`` (duck-typed)."""
    if oplog is None:
        from sqlalchemy.orm import sessionmaker

        db = make_party_engine(settings.resolved_database_url())
        oplog = OpLog(sessionmaker(db, expire_on_commit=False), Gallery(),
                      after_erase=getattr(engine, "forget_rows", None))
        oplog.load()
    token = settings.internal_token.encode()
    pin = normalize_pin(settings.gateway_cert_sha256).encode() if settings.gateway_cert_sha256 else None
    thresholds = Thresholds(oplog.sessions)
    audit = MatchAudit(oplog.sessions, settings.rank)
    bucket = TokenBucket(settings.match_rate_per_s, settings.match_burst)
    metrics = PartyMetrics()

    def require_token(request: Request) -> None:
        """This link's bearer token, and (when pinned) the gateway's certificate on this connection."""
        if pin is not None:
            seen = getattr(request.state, "peer_cert_sha256", None) or ""
            if not hmac.compare_digest(seen.encode(), pin):
                raise PartyProblem(403, "client-not-pinned", "Client certificate not accepted",
                                   "This party serves only the gateway's pinned client certificate.")
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token):
            raise PartyProblem(401, "unauthorized", "Missing or invalid internal token",
                               "This route needs this party's bearer token.", headers={"WWW-Authenticate": "Bearer"})

    app = FastAPI(title=f"privface party {settings.rank}", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.oplog = oplog
    app.state.engine = engine
    app.state.jobs_run = 0  # MPC jobs this process ran (a batch counts once): shows the gateway's batching
    app.state.settings = settings
    app.state.metrics = metrics
    install_problem_handlers(app, "The party failed.", log)
    install_traffic_log(app, settings.traffic_log)

    @app.middleware("http")
    async def _limit_body(request: Request, call_next):  # type: ignore[no-untyped-def]
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_request_bytes:
            return problem_response(PartyProblem(413, "payload-too-large", "Request too large",
                                                 f"limit {settings.max_request_bytes} bytes"), request.url.path)
        return await call_next(request)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "rank": settings.rank}

    api = APIRouter(prefix="/internal", dependencies=[Depends(require_token)])

    @api.post("/ops/prepare", response_model=OpOut)
    def prepare(body: PrepareIn) -> OpOut:
        share = None
        if body.share is not None:
            try:
                share = base64.b64decode(body.share.encode("ascii"), validate=True)
            except (ValueError, UnicodeEncodeError):
                raise PartyProblem(422, "op-invalid", "Invalid operation", "share is not valid base64") from None
        spec = OpSpec(seq=body.seq, kind=body.kind, model_version=body.model_version, template_seq=body.template_seq,
                      template_seqs=tuple(body.template_seqs), share=share)
        try:
            state = oplog.prepare(spec)
        except OpError as exc:
            raise _op_problem(exc) from None
        log.info("prepared op %d (%s)", body.seq, body.kind)
        return OpOut(seq=body.seq, state=state)

    def decide(seq: int, apply, verb: str) -> OpOut:  # noqa: ANN001
        """Commit or abort: both idempotent at the op log; errors become problem+json."""
        try:
            state = apply(seq)
        except OpError as exc:
            raise _op_problem(exc) from None
        log.info("%s op %d", verb, seq)
        return OpOut(seq=seq, state=state)

    @api.post("/ops/{seq}/commit", response_model=OpOut)
    def commit(seq: int = Path(..., gt=0)) -> OpOut:
        return decide(seq, oplog.commit, "committed")

    @api.post("/ops/{seq}/abort", response_model=OpOut)
    def abort(seq: int = Path(..., gt=0)) -> OpOut:
        return decide(seq, oplog.abort, "aborted")

    @api.get("/ops/{seq}", response_model=OpOut)
    def op_state(seq: int = Path(..., gt=0)) -> OpOut:
        return OpOut(seq=seq, state=oplog.op_state(seq))

    @api.get("/state")
    def state() -> dict[str, Any]:
        try:
            mpc = engine.status()
        except Exception as exc:  # noqa: BLE001 - report, never fail the state call
            mpc = {"ready": False, "error": type(exc).__name__}
        return {"rank": settings.rank, "applied_through": oplog.applied_through, "pending": oplog.pending_seqs(),
                "committed_count": oplog.committed_count(), "versions": oplog.gallery.counts(), "mpc": mpc,
                "jobs_run": app.state.jobs_run}

    @api.post("/galleries", response_model=GalleryOut)
    async def register_gallery(body: GalleryIn) -> GalleryOut:
        """Record a gallery's thresholds once (the gateway does it before the gallery's first match job)."""
        try:
            policy = GalleryPolicy.from_json(body.threshold, body.identify_thresholds)
            value = await run_in_threadpool(thresholds.register, body.model_version, policy)
        except ValueError as exc:
            raise PartyProblem(422, "threshold-out-of-range", "Threshold out of range", str(exc)) from None
        except ThresholdConflict as exc:
            raise PartyProblem(409, "threshold-fixed", "The gallery's threshold is fixed",
                               f"{exc}; a gallery's threshold never changes (register a new gallery)") from None
        log.info("gallery %s registered (verify threshold %.6f, %d identify entries)", body.model_version,
                 value.verify, len(value.identify))
        return GalleryOut(model_version=body.model_version, threshold=value.verify,
                          identify_thresholds=value.schedule_json() or None)

    def gallery_policy(body: MatchIn) -> GalleryPolicy:
        """The gallery's recorded thresholds (never the request's)."""
        recorded = thresholds.get(body.model_version)
        if recorded is None:
            raise PartyProblem(409, "gallery-unregistered", "Gallery not registered",
                               "register the gallery (POST /internal/galleries) before matching on it")
        return recorded

    def job_threshold(body: MatchIn, policy: GalleryPolicy, n: int) -> float:
        """The threshold for this job (identify: by the gallery's size n); a request may only repeat it."""
        threshold = policy.threshold(body.kind, n)
        if body.threshold is not None and body.threshold != threshold:
            raise PartyProblem(409, "threshold-mismatch", "Threshold is not the gallery's",
                               "a match job runs at the gallery's recorded threshold only")
        return threshold

    async def spend_budget(body: MatchIn) -> None:
        wait = bucket.take()
        if wait > 0:
            await run_in_threadpool(audit.record, body.job_id, body.kind, body.model_version, 0, 0, 429)
            raise PartyProblem(429, "rate-limited", "Too many match jobs",
                               f"this link allows {settings.match_rate_per_s:g} match jobs per second",
                               headers={"Retry-After": TokenBucket.retry_after(wait)})

    @api.post("/match/check", response_model=CheckOut)
    async def match_check(body: CheckIn) -> CheckOut:
        """Would a match job on this snapshot run here, and on which rows? (No share is involved.)

        The coordinator asks both parties first, so that the MPC starts only when both will take part
        with identical galleries (a party that refuses alone would leave its peer waiting in the MPC).
        """
        def take() -> tuple[int, str]:
            _, labels = oplog.match_rows(body.model_version, body.upto_seq, body.expected_committed,
                                         body.template_seqs if body.kind == "verify" else None)
            return int(labels.shape[0]), labels_digest(labels)

        try:
            n, digest = await run_in_threadpool(take)
        except OpError as exc:
            raise _op_problem(exc) from None
        except SnapshotTooOld as exc:
            raise PartyProblem(409, "snapshot-too-old", "Snapshot too old", str(exc)) from None
        return CheckOut(n=n, labels_digest=digest)

    @api.post("/match", response_model=MatchOut, response_model_exclude_none=True)
    async def match(body: MatchIn) -> MatchOut:
        """Answer a match job, counted and timed by kind and status (refusals included)."""
        start, status = time.perf_counter(), 500
        try:
            out = await answer_match(body)
            status = 200
            return out
        except PartyProblem as exc:
            status = exc.status
            raise
        finally:
            metrics.observe_job(body.kind, status, time.perf_counter() - start)

    async def answer_match(body: MatchIn) -> MatchOut:
        def invalid(detail: str) -> PartyProblem:
            return PartyProblem(422, "validation-error", "The request is not valid", detail)

        if body.threshold is not None and not math.isfinite(body.threshold):
            raise invalid("threshold must be finite")
        if body.kind == "verify" and not body.template_seqs:
            raise invalid("verify names template_seqs")
        if (body.query_share is None) == (body.query_shares is None):
            raise invalid("give exactly one of query_share and query_shares")
        if body.query_shares is not None and body.kind != "identify":
            raise invalid("query_shares (a batch) is for identify only")
        await spend_budget(body)
        policy = gallery_policy(body)

        def take_rows() -> tuple[np.ndarray, np.ndarray, str]:
            shares, labels = oplog.match_rows(body.model_version, body.upto_seq, body.expected_committed,
                                              body.template_seqs if body.kind == "verify" else None)
            return shares, labels, labels_digest(labels)

        try:  # off the event loop: a filtered snapshot of a large gallery is a big copy
            shares, labels, digest = await run_in_threadpool(take_rows)
        except OpError as exc:
            raise _op_problem(exc) from None
        except SnapshotTooOld as exc:
            raise PartyProblem(409, "snapshot-too-old", "Snapshot too old", str(exc)) from None
        n = int(labels.shape[0])
        threshold = job_threshold(body, policy, n)
        batch = body.query_shares
        if n == 0:  # nothing to match: both parties (in sync) answer 0 without running the MPC
            await run_in_threadpool(audit.record, body.job_id, body.kind, body.model_version, 0,
                                    1 if batch is None else len(batch), 200)
            if batch is not None:
                return MatchOut(job_id=body.job_id, shares=["0"] * len(batch), n=0, labels_digest=digest)
            return MatchOut(job_id=body.job_id, share="0", n=0, labels_digest=digest)
        try:
            if batch is None:
                query = from_b64(body.query_share, dim=shares.shape[1])
            else:  # [Q, d]: one MPC job (one tournament) for all queries
                query = np.stack([from_b64(text, dim=shares.shape[1]) for text in batch])
        except ValueError as exc:
            field = "query_share" if batch is None else "query_shares"
            raise invalid(f"{field}: {exc}") from None
        queries = 1 if batch is None else len(batch)
        status = await run_job(body, query, shares, labels, digest, threshold)
        await run_in_threadpool(audit.record, body.job_id, body.kind, body.model_version, n, queries, status[0])
        if isinstance(status[1], PartyProblem):
            raise status[1]
        out = status[1]
        app.state.jobs_run += 1
        if batch is not None:
            outs = list(out)
            if len(outs) != len(batch):
                log.error("match job %s returned %d shares for %d queries", body.job_id, len(outs), len(batch))
                raise PartyProblem(500, "mpc-failed", "Secure computation failed", "wrong number of outputs")
            return MatchOut(job_id=body.job_id, shares=[str(int(v) % (1 << 64)) for v in outs], n=n,
                            labels_digest=digest)
        return MatchOut(job_id=body.job_id, share=str(int(out) % (1 << 64)), n=n, labels_digest=digest)

    async def run_job(body: MatchIn, query: np.ndarray, shares: np.ndarray, labels: np.ndarray, digest: str,
                      threshold: float) -> tuple[int, Any]:
        """Run the MPC job: (200, output) or (status, PartyProblem) — the caller audits, then answers."""
        MatchJob, MpcUnavailable = _mpc_types()
        # a template's share never changes under its label, so (model version, labels) names the snapshot
        gallery_id = f"{body.model_version}:{digest}" if body.kind == "identify" else None
        job = MatchJob(job_id=body.job_id, kind=body.kind, query_share=query, gallery_share=shares, labels=labels,
                       gallery_id=gallery_id, threshold=threshold)
        timeout = min(body.timeout_s or settings.match_timeout_s, settings.match_timeout_s)
        try:
            out = await run_in_threadpool(engine.submit, job, timeout)
            metrics.observe_mpc(body.kind, engine.job_stats(body.job_id) if hasattr(engine, "job_stats") else None)
            return 200, out
        except (MpcUnavailable, TimeoutError) as exc:
            log.warning("match job %s unavailable: %s", body.job_id, type(exc).__name__)
            return 503, PartyProblem(503, "mpc-unavailable", "Secure computation unavailable",
                                     f"the MPC engine could not run the job ({type(exc).__name__})",
                                     headers={"Retry-After": "2"})
        except Exception as exc:  # noqa: BLE001
            log.error("match job %s failed: %s", body.job_id, type(exc).__name__)
            return 500, PartyProblem(500, "mpc-failed", "Secure computation failed", type(exc).__name__)

    @app.get("/metrics", include_in_schema=False, dependencies=[Depends(require_token)])
    def prometheus_metrics() -> Response:
        """Prometheus metrics, behind this link's token like every internal route (docs/operations.md)."""
        try:
            mpc = engine.status()
        except Exception:  # noqa: BLE001 - a scrape reports the engine down, never fails
            mpc = {"connected": False}
        body, content_type = metrics.render(oplog.gallery.counts(), mpc)
        return Response(body, media_type=content_type)

    app.include_router(api)
    return app


def uvicorn_ssl_options(settings: PartySettings) -> dict[str, Any]:
    """uvicorn's TLS options; with a CA, clients need a certificate, and a pin names the one accepted."""
    if not settings.ssl_certfile:
        return {}
    import ssl

    opts: dict[str, Any] = {"ssl_certfile": settings.ssl_certfile, "ssl_keyfile": settings.ssl_keyfile}
    if settings.ssl_ca_certs:
        opts.update(ssl_ca_certs=settings.ssl_ca_certs, ssl_cert_reqs=ssl.CERT_REQUIRED)
    if settings.gateway_cert_sha256:
        opts["http"] = PeerCertH11Protocol  # exposes the client certificate's fingerprint to require_token
    return opts


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def deployment_problems(settings: PartySettings) -> list[str]:
    """What makes this configuration unsafe to serve (empty: fine).

    Off loopback a party needs a non-development token, HTTPS, mutual TLS and the gateway's pin: plain
    HTTP or a token anyone can read in the source would hand the gateway's link to whoever reaches it.
    On loopback only inconsistencies are refused (a pin needs mTLS; a pin must be well formed).
    """
    problems = []
    if settings.gateway_cert_sha256:
        try:
            normalize_pin(settings.gateway_cert_sha256)
        except ValueError as exc:
            problems.append(f"PRIVFACE_PARTY_GATEWAY_CERT_SHA256: {exc}")
        if not (settings.ssl_certfile and settings.ssl_ca_certs):
            problems.append("a gateway pin needs TLS with a client CA (PRIVFACE_PARTY_SSL_CERTFILE, _SSL_CA_CERTS)")
    if _is_loopback(settings.host):
        return problems
    if settings.has_dev_token():
        problems.append(f"the development token is refused off loopback (set PRIVFACE_PARTY{settings.rank}_TOKEN)")
    if not (settings.ssl_certfile and settings.ssl_keyfile):
        problems.append("plain HTTP is refused off loopback (set PRIVFACE_PARTY_SSL_CERTFILE and _SSL_KEYFILE)")
    if not settings.ssl_ca_certs:
        problems.append("mutual TLS is required off loopback (set PRIVFACE_PARTY_SSL_CA_CERTS)")
    if not settings.gateway_cert_sha256:
        problems.append("the gateway's certificate must be pinned off loopback (PRIVFACE_PARTY_GATEWAY_CERT_SHA256)")
    return problems


def check_deployment(settings: PartySettings) -> None:
    """Refuse to start (SystemExit) on any of ``deployment_problems``; nothing is touched before."""
    problems = deployment_problems(settings)
    if problems:
        raise SystemExit(f"party {settings.rank} refuses to serve on {settings.host}: " + "; ".join(problems))


def run_party(settings: PartySettings | None = None) -> None:
    """Check, migrate, load, start the MPC engine and serve (blocking). Used by ``privface party --rank R``."""
    import uvicorn

    settings = settings or PartySettings()
    check_deployment(settings)
    url = settings.resolved_database_url()
    migrate_party_db(url)
    from secure.mpc.sharding import make_engine
    from secure.mpc.settings import MpcSettings

    engine = make_engine(settings.rank, MpcSettings())
    app = create_party_app(settings, engine)
    engine.start()
    try:
        uvicorn.run(app, host=settings.host, port=settings.resolved_port(), log_level=settings.log_level,
                    **uvicorn_ssl_options(settings))
    finally:
        engine.stop()
