"""The gateway application: `create_app(settings)` builds it; uvicorn serves `app.main:app`."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import redis
from fastapi import FastAPI

from app.apidocs import install_docs
from app.context import GatewayContext
from app.db import make_engine, make_sessionmaker
from app.limits import BodySizeLimit
from app.metrics import PRECHECKS, RequestMetrics
from app.migrate import migrate_gateway
from app.problems import install_problem_handlers
from app.routers import admin, admin_tenants, console, matching, sealed, service, subjects
from app.services import operations
from app.services.abuse import AbuseControls
from app.services.counters import MemoryCounters, RedisCounters
from app.services.identify_batcher import IdentifyBatcher
from app.services.jobs import JobRunner
from app.services.model_events import sync_active_model, watch_model_activations
from app.services.model_registry import ServedModels
from app.services.replay import ReplayGuard
from app.settings import GatewaySettings, get_settings
from common.logs import RequestIdMiddleware
from secure.coordinator import PartyPair
from secure.pacing import JobPacer
from secure.precheck import PrecheckPolicy

log = logging.getLogger(__name__)
RECONCILE_EVERY_S = 5.0

DESCRIPTION = """Privacy-preserving face verification. Clients upload noised frequency-domain features made by
the SDK (never an image). Templates are stored as two secret shares at two non-colluding parties, and
matching runs under two-party computation: verify reveals one bit, identify one bit plus the subject id
on a match. Errors are RFC 9457 `application/problem+json`."""


def build_context(settings: GatewaySettings) -> GatewayContext:
    engine = make_engine(settings.database_url)
    sessions = make_sessionmaker(engine)
    redis_client = redis.Redis.from_url(settings.redis_url) if settings.redis_url else None
    pacer = JobPacer(settings.party_jobs_in_flight, settings.party_jobs_per_s, settings.party_jobs_burst,
                     max_wait_s=settings.party_timeout_s)
    parties = PartyPair(settings.party_urls, settings.party_tokens, settings.party_timeout_s, pacer=pacer,
                        precheck=PrecheckPolicy(settings.party_precheck, on_sent=PRECHECKS.inc),
                        **settings.party_tls())
    return GatewayContext(
        settings=settings, engine=engine, sessions=sessions,
        models=ServedModels(settings.model_dir, settings.prefer_gpu, settings.batch_max, settings.batch_wait_ms,
                            settings.identify_fpir, settings.default_preset, settings.ort_threads),
        parties=parties,
        replay=ReplayGuard(sessions, settings.replay_window_s, settings.clock_skew_s, settings.nonce_ttl_s,
                           redis_client),
        abuse=AbuseControls(RedisCounters(redis_client) if redis_client else MemoryCounters(), settings),
        jobs=JobRunner(settings, sessions),
        identify_batcher=IdentifyBatcher(parties, settings.identify_batch_wait_ms, settings.identify_batch_max),
    )


async def _reconcile_forever(ctx: GatewayContext) -> None:
    """Finish interrupted operations (crashes, lost replies) for as long as the gateway runs."""
    while True:
        try:
            await operations.reconcile(ctx.sessions, ctx.parties, stale_after_s=operations.stale_after(ctx.settings.party_timeout_s))
        except Exception:
            log.exception("reconcile pass failed")
        await asyncio.sleep(RECONCILE_EVERY_S)


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        migrate_gateway(settings.database_url)
        ctx = build_context(settings)
        app.state.ctx = ctx
        await sync_active_model(ctx.sessions, ctx.models)
        tasks = [asyncio.create_task(watch_model_activations(ctx.sessions, ctx.models, settings.redis_url,
                                                             settings.model_poll_s)),
                 asyncio.create_task(_reconcile_forever(ctx))]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await ctx.parties.aclose()
            ctx.jobs.shutdown()
            ctx.engine.dispose()

    app = FastAPI(title="privface", version="0.1.0", description=DESCRIPTION, lifespan=lifespan,
                  docs_url=None, redoc_url=None)  # served from local assets by install_docs
    install_problem_handlers(app)
    install_docs(app)
    for module in (subjects, matching, sealed, admin, admin_tenants, service, console):
        app.include_router(module.router)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes,
                       sealed_max_bytes=settings.sealed_max_body_bytes)
    app.add_middleware(RequestMetrics)  # outside BodySizeLimit, so it also counts what that refuses
    app.add_middleware(RequestIdMiddleware)  # added last: outermost, so every log line of a request has its id
    return app


def app() -> FastAPI:
    """uvicorn factory: `uvicorn --factory app.main:app`."""
    return create_app()
