"""A party's internal API (FastAPI): two-phase ops from the gateway, state, and MPC match jobs.

Every route but /healthz requires ``Authorization: Bearer <internal token>`` (constant-time compare).
Shares and queries are never logged. ``run_party(settings)`` migrates the database, rebuilds the gallery,
starts the MPC engine and serves (HTTPS when a certificate is configured; mTLS when a CA is).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import math
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Path, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from secure.party.db import make_party_engine, migrate_party_db
from secure.party.gallery import Gallery, SnapshotTooOld
from secure.party.oplog import OpError, OpLog, OpSpec
from secure.party.problems import PartyProblem, install_problem_handlers
from secure.party.settings import DEV_INTERNAL_TOKEN, PartySettings
from secure.party.traffic import install_traffic_log
from secure.sharing import from_b64

log = logging.getLogger("privface.party")
JOB_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
MAX_QUERY_BATCH = 64  # identify: most queries in one job (the gateway batches concurrent requests)


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
    threshold: float
    timeout_s: float | None = Field(None, gt=0)


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

    def require_token(request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token):
            raise PartyProblem(401, "unauthorized", "Missing or invalid internal token",
                               "This route needs the internal bearer token.", headers={"WWW-Authenticate": "Bearer"})

    app = FastAPI(title=f"privface party {settings.rank}", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.oplog = oplog
    app.state.engine = engine
    app.state.jobs_run = 0  # MPC jobs this process ran (a batch counts once): shows the gateway's batching
    app.state.settings = settings
    install_problem_handlers(app)
    install_traffic_log(app, settings.traffic_log)

    @app.middleware("http")
    async def _limit_body(request: Request, call_next):  # type: ignore[no-untyped-def]
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_request_bytes:
            from secure.party.problems import problem_response

            return problem_response(413, "payload-too-large", "Request too large",
                                    f"limit {settings.max_request_bytes} bytes", request.url.path)
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
        def invalid(detail: str) -> PartyProblem:
            return PartyProblem(422, "validation-error", "The request is not valid", detail)

        if not math.isfinite(body.threshold):
            raise invalid("threshold must be finite")
        if body.kind == "verify" and not body.template_seqs:
            raise invalid("verify names template_seqs")
        if (body.query_share is None) == (body.query_shares is None):
            raise invalid("give exactly one of query_share and query_shares")
        if body.query_shares is not None and body.kind != "identify":
            raise invalid("query_shares (a batch) is for identify only")

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
        batch = body.query_shares
        if n == 0:  # nothing to match: both parties (in sync) answer 0 without running the MPC
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
        MatchJob, MpcUnavailable = _mpc_types()
        # a template's share never changes under its label, so (model version, labels) names the snapshot
        gallery_id = f"{body.model_version}:{digest}" if body.kind == "identify" else None
        job = MatchJob(job_id=body.job_id, kind=body.kind, query_share=query, gallery_share=shares, labels=labels,
                       gallery_id=gallery_id,
                       threshold=float(body.threshold))
        timeout = min(body.timeout_s or settings.match_timeout_s, settings.match_timeout_s)
        try:
            out = await run_in_threadpool(engine.submit, job, timeout)
        except (MpcUnavailable, TimeoutError) as exc:
            log.warning("match job %s unavailable: %s", body.job_id, type(exc).__name__)
            raise PartyProblem(503, "mpc-unavailable", "Secure computation unavailable",
                               f"the MPC engine could not run the job ({type(exc).__name__})",
                               headers={"Retry-After": "2"}) from None
        except Exception as exc:  # noqa: BLE001
            log.error("match job %s failed: %s", body.job_id, type(exc).__name__)
            raise PartyProblem(500, "mpc-failed", "Secure computation failed", type(exc).__name__) from None
        app.state.jobs_run += 1
        if batch is not None:
            outs = list(out)
            if len(outs) != len(batch):
                log.error("match job %s returned %d shares for %d queries", body.job_id, len(outs), len(batch))
                raise PartyProblem(500, "mpc-failed", "Secure computation failed", "wrong number of outputs")
            return MatchOut(job_id=body.job_id, shares=[str(int(v) % (1 << 64)) for v in outs], n=n,
                            labels_digest=digest)
        return MatchOut(job_id=body.job_id, share=str(int(out) % (1 << 64)), n=n, labels_digest=digest)

    app.include_router(api)
    return app


def uvicorn_ssl_options(settings: PartySettings) -> dict[str, Any]:
    if not settings.ssl_certfile:
        return {}
    import ssl

    opts: dict[str, Any] = {"ssl_certfile": settings.ssl_certfile, "ssl_keyfile": settings.ssl_keyfile}
    if settings.ssl_ca_certs:
        opts.update(ssl_ca_certs=settings.ssl_ca_certs, ssl_cert_reqs=ssl.CERT_REQUIRED)
    return opts


def _is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "::1", "localhost")


def run_party(settings: PartySettings | None = None) -> None:
    """Migrate, load, start the MPC engine and serve (blocking). Used by ``privface party --rank R``."""
    import uvicorn

    settings = settings or PartySettings()
    if settings.internal_token == DEV_INTERNAL_TOKEN and not _is_loopback(settings.host):
        raise SystemExit("refusing to serve on a non-loopback address with the development internal token")
    if not settings.ssl_certfile and not _is_loopback(settings.host):
        log.warning("party %d serves plain HTTP on %s: use TLS between the gateway and the parties",
                    settings.rank, settings.host)
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
