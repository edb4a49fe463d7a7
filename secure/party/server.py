"""A party's internal API (FastAPI): two-phase ops from the gateway, state, and MPC match jobs.

Every route but /healthz (``/metrics`` included) requires ``Authorization: Bearer <this link's token>``
(constant-time compare; each party has its own token, see ``settings.py``) and, when a pin is configured, the
gateway's own client certificate (``tlspin.py``). The bodies are the models of ``api.py``; match jobs are answered by
``matching.py`` (the gallery's recorded threshold, rate limit, audit). Shares and queries are never logged.
``run_party(settings)`` checks the deployment (``deployment.py``), migrates the database, rebuilds the gallery,
starts the MPC engine and serves (HTTPS when a certificate is configured; mTLS when a CA is).
"""
from __future__ import annotations

import base64
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Path, Request, Response
from sqlalchemy.orm import sessionmaker
from starlette.concurrency import run_in_threadpool

from common.logs import RequestIdMiddleware, configure_logging, logging_config
from common.problems import Problem as PartyProblem
from common.problems import install_problem_handlers, problem_response
from secure.party.api import (CheckIn, CheckOut, GalleryIn, GalleryOut, MatchIn, MatchOut, OpOut, PrepareIn,
                              SealedKeyOut, StateOut)
from secure.party.audit import MatchAudit
from secure.party.db import make_party_engine, migrate_party_db
from secure.party.deployment import check_deployment, uvicorn_options
from secure.party.gallery import Gallery
from secure.party.matching import MatchDesk, MatchEngine, op_problem
from secure.party.metrics import PartyMetrics
from secure.party.nonces import NonceStore
from secure.party.oplog import OpError, OpLog, OpSpec
from secure.party.sealed import SealedInputs, sealed_routes
from secure.party.settings import PartySettings
from secure.party.thresholds import ThresholdConflict, Thresholds
from secure.party.tlspin import normalize_pin
from secure.sealed_box import SCHEME as SEALED_SCHEME
from secure.sealed_box import party_key_from_env
from secure.party.traffic import install_traffic_log
from secure.thresholds import GalleryPolicy

log = logging.getLogger("privface.party")


def _token_check(settings: PartySettings, scrape: bool = False) -> Callable[[Request], None]:
    """The dependency every internal route has: this link's bearer token, and (when pinned) the gateway's
    certificate on this connection, checked first. `scrape` (GET /metrics only) also takes the party's
    metrics token, a read-only scrape credential: the certificate pin does not apply to it (the scraper is
    not the gateway), and presented anywhere else it is refused 403."""
    token = settings.internal_token.encode()
    scrape_token = settings.metrics_token.encode() if settings.metrics_token else None
    pin = normalize_pin(settings.gateway_cert_sha256).encode() if settings.gateway_cert_sha256 else None

    def require_token(request: Request) -> None:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        presented = value.strip().encode() if scheme.lower() == "bearer" else b""
        if scrape_token is not None and hmac.compare_digest(presented, scrape_token):
            if scrape:
                return
            raise PartyProblem(403, "metrics-only", "A metrics credential",
                               "This token may scrape GET /metrics and nothing else.")
        if pin is not None:
            seen = getattr(request.state, "peer_cert_sha256", None) or ""
            if not hmac.compare_digest(seen.encode(), pin):
                raise PartyProblem(403, "client-not-pinned", "Client certificate not accepted",
                                   "This party serves only the gateway's pinned client certificate.")
        if scheme.lower() != "bearer" or not hmac.compare_digest(presented, token):
            raise PartyProblem(401, "unauthorized", "Missing or invalid internal token",
                               "This route needs this party's bearer token.", headers={"WWW-Authenticate": "Bearer"})

    return require_token


def _limit_body(app: FastAPI, max_bytes: int) -> None:
    """Refuse a request whose declared body exceeds ``max_bytes`` before reading it."""
    @app.middleware("http")
    async def limit_body(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            return problem_response(PartyProblem(413, "payload-too-large", "Request too large",
                                                 f"limit {max_bytes} bytes"), request.url.path)
        return await call_next(request)


def _default_oplog(settings: PartySettings, engine: MatchEngine) -> OpLog:
    """The op log over this party's database, loaded; a committed delete makes the engine forget its rows."""
    db = make_party_engine(settings.resolved_database_url())
    oplog = OpLog(sessionmaker(db, expire_on_commit=False), Gallery(),
                  after_erase=getattr(engine, "forget_rows", None))
    oplog.load()
    return oplog


def _share_bytes(text: str | None) -> bytes | None:
    if text is None:
        return None
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise PartyProblem(422, "op-invalid", "Invalid operation", "share is not valid base64") from None


def _ops_routes(api: APIRouter, oplog: OpLog) -> None:
    """The two-phase operations: prepare, then commit or abort (both idempotent at the op log)."""
    @api.post("/ops/prepare", response_model=OpOut)
    def prepare(body: PrepareIn) -> OpOut:
        spec = OpSpec(seq=body.seq, kind=body.kind, gallery=body.gallery, template_seq=body.template_seq,
                      template_seqs=tuple(body.template_seqs), share=_share_bytes(body.share))
        try:
            state = oplog.prepare(spec)
        except OpError as exc:
            raise op_problem(exc) from None
        log.info("prepared op %d (%s)", body.seq, body.kind)
        return OpOut(seq=body.seq, state=state)

    def decide(seq: int, apply: Callable[[int], str], verb: str) -> OpOut:
        try:
            state = apply(seq)
        except OpError as exc:
            raise op_problem(exc) from None
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


def _gallery_routes(api: APIRouter, thresholds: Thresholds) -> None:
    @api.post("/galleries", response_model=GalleryOut)
    async def register_gallery(body: GalleryIn) -> GalleryOut:
        """Record a gallery's thresholds once (the gateway does it before the gallery's first match job)."""
        try:
            policy = GalleryPolicy.from_json(body.threshold, body.identify_thresholds)
            value = await run_in_threadpool(thresholds.register, body.gallery, policy)
        except ValueError as exc:
            raise PartyProblem(422, "threshold-out-of-range", "Threshold out of range", str(exc)) from None
        except ThresholdConflict as exc:
            raise PartyProblem(409, "threshold-fixed", "The gallery's threshold is fixed",
                               f"{exc}; a gallery's threshold never changes (register a new gallery)") from None
        log.info("gallery %s registered (verify threshold %.6f, %d identify entries)", body.gallery,
                 value.verify, len(value.identify))
        return GalleryOut(gallery=body.gallery, threshold=value.verify,
                          identify_thresholds=value.schedule_json() or None)


def _engine_status(engine: MatchEngine, down: dict[str, Any]) -> dict[str, Any]:
    """The engine's status, or ``down`` with the error's name: a status call never fails the route."""
    try:
        return engine.status()
    except Exception as exc:  # noqa: BLE001
        return {**down, "error": type(exc).__name__}


def create_party_app(settings: PartySettings, engine: MatchEngine, *, oplog: OpLog | None = None) -> FastAPI:
    """The party app. ``engine``: a started-or-startable ``secure.mpc.engine.MpcEngine`` (or a stand-in)."""
    if oplog is None:
        oplog = _default_oplog(settings, engine)
    thresholds = Thresholds(oplog.sessions)
    metrics = PartyMetrics()
    sealed_key = party_key_from_env()  # sealed mode (issue 12): the key the SDK seals this party's share to
    sealed = SealedInputs(settings.rank, sealed_key, settings.sealed_model_dir,
                          NonceStore(oplog.sessions, settings.sealed_replay_window_s))
    desk = MatchDesk(settings, engine, oplog, thresholds, MatchAudit(oplog.sessions, settings.rank), metrics,
                     sealed)
    require_token = _token_check(settings)

    app = FastAPI(title=f"privface party {settings.rank}", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.oplog, app.state.engine, app.state.settings, app.state.metrics = oplog, engine, settings, metrics
    install_problem_handlers(app, "The party failed.", log)
    install_traffic_log(app, settings.traffic_log)
    _limit_body(app, settings.max_request_bytes)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "rank": settings.rank}

    api = APIRouter(prefix="/internal", dependencies=[Depends(require_token)])
    _ops_routes(api, oplog)
    _gallery_routes(api, thresholds)

    @api.get("/state", response_model=StateOut)
    def state() -> StateOut:
        return StateOut(rank=settings.rank, applied_through=oplog.applied_through, pending=oplog.pending_seqs(),
                        committed_count=oplog.committed_count(), versions=oplog.gallery.counts(),
                        mpc=_engine_status(engine, {"ready": False}), jobs_run=desk.jobs_run)

    @api.post("/match/check", response_model=CheckOut)
    async def match_check(body: CheckIn) -> CheckOut:
        """The coordinator asks both parties first, so that the MPC starts only when both will take part with
        identical galleries (a party that refuses alone would leave its peer waiting in the MPC)."""
        return await desk.check(body)

    @api.post("/match", response_model=MatchOut, response_model_exclude_none=True)
    async def match(body: MatchIn) -> MatchOut:
        return await desk.match(body)

    app.state.sealed_key = sealed_key
    sealed_routes(api, desk, oplog, sealed)

    @api.get("/sealed/key", response_model=SealedKeyOut)
    def sealed_key_route() -> SealedKeyOut:
        return SealedKeyOut(rank=settings.rank, scheme=SEALED_SCHEME, public_key=sealed_key.public_b64,
                            key_id=sealed_key.key_id)

    @app.get("/metrics", include_in_schema=False, dependencies=[Depends(_token_check(settings, scrape=True))])
    def prometheus_metrics() -> Response:
        """Prometheus metrics, behind this link's token like every internal route, or the party's metrics
        token (PRIVFACE_PARTY_METRICS_TOKEN; docs/operations.md)."""
        mpc = _engine_status(engine, {"connected": False})  # a scrape reports the engine down, never fails
        body, content_type = metrics.render(oplog.gallery.counts(), mpc)
        return Response(body, media_type=content_type)

    app.include_router(api)
    # added last, so outermost: every line of a call, its access line too, has the gateway's X-Request-ID
    app.add_middleware(RequestIdMiddleware, generate=False)
    return app


def run_party(settings: PartySettings | None = None) -> None:
    """Check, start the MPC engine, migrate, load and serve (blocking). Used by ``privface party --rank R``."""
    import uvicorn

    from secure.mpc.settings import MpcSettings
    from secure.mpc.sharding import make_engine

    settings = settings or PartySettings()
    check_deployment(settings)
    engine = make_engine(settings.rank, MpcSettings())
    engine.start()  # first: its worker loads torch while this process migrates and loads the gallery (restarts)
    try:
        migrate_party_db(settings.resolved_database_url())
        app = create_party_app(settings, engine)
        # logged in the process's format (JSON lines stay JSON); the operator publishes this line's value
        configure_logging()
        log.info("party %s sealed key fingerprint (for PRIVFACE_SDK_SEALED_KEY_PINS): %s",
                 settings.rank, app.state.sealed_key.fingerprint)
        uvicorn.run(app, host=settings.host, port=settings.resolved_port(), log_level=settings.log_level,
                    log_config=logging_config(), **uvicorn_options(settings))
    finally:
        engine.stop()
