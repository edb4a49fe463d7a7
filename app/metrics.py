"""The gateway's Prometheus metrics: what an operator graphs and alerts on (docs/operations.md).

Labels are bounded by construction, never taken from the request: a route is its *template*
(`/v1/subjects/{subject_id}`, never the id), an unknown path is `<unmatched>`, an unknown method `OTHER`,
a status is a three-digit code. No label ever holds a subject id, an API key, a tenant or a nonce, so a
scrape neither leaks data nor grows without bound under a fuzzer.

Several uvicorn workers (`privface gateway --workers N`) share one port, so a scraper cannot reach each
worker: the CLI then sets PROMETHEUS_MULTIPROC_DIR and every worker writes its samples to files there,
which whichever worker answers `/metrics` aggregates (prometheus_client's multiprocess mode).
"""
from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from prometheus_client import (CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest, multiprocess)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
UNMATCHED = "<unmatched>"
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

REQUESTS = Counter("privface_http_requests", "HTTP requests answered, by method, route template and status.",
                   ["method", "route", "status"])
LATENCY = Histogram("privface_http_request_duration_seconds", "Time to answer an HTTP request (to its last byte).",
                    ["method", "route", "status"], buckets=LATENCY_BUCKETS)
IDENTIFY_BATCH = Histogram("privface_identify_batch_size", "Identify queries that shared one MPC job.",
                           buckets=(1, 2, 4, 8, 16, 32, 64))
BUDGET_REFUSALS = Counter("privface_budget_refusals", "Requests refused by an abuse budget: 429 (rate-limited) "
                          "or 423 (subject locked after failed verifies).", ["route", "reason"])
PRECHECKS = Counter("privface_party_prechecks", "Prechecks sent before an MPC job (to both parties: does each hold "
                    "the job's snapshot?); with PRIVFACE_PARTY_PRECHECK=after-refusal, only after a job that did not run.")
# gauges: the most recent value written by any worker is the truth (multiprocess mode "mostrecent")
MODEL_INFO = Gauge("privface_model_info", "1 for the model version this gateway serves, 0 for one it served before.",
                   ["version"], multiprocess_mode="mostrecent")
PARTY_UP = Gauge("privface_party_up", "1 when the party answered its state call at the last check, else 0.",
                 ["party"], multiprocess_mode="mostrecent")
PARTY_MPC = Gauge("privface_party_mpc_connected", "1 when the party reported its MPC engine connected at the last "
                  "check, else 0.", ["party"], multiprocess_mode="mostrecent")

_served_versions: set[str] = set()  # versions this process has labelled, so an old one can be set to 0


def route_label(scope: MutableMapping[str, Any]) -> str:
    """The matched route's path template, or `<unmatched>`: never the raw path (ids, fuzz)."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED


def method_label(method: str) -> str:
    return method if method in KNOWN_METHODS else "OTHER"


def record_model(versions: Iterable[str]) -> None:
    """Mark `versions` (one active per privacy preset) as served (1) and every other version this process
    labelled as 0."""
    serving = set(versions)
    for old in _served_versions - serving:
        MODEL_INFO.labels(version=old).set(0)
    for version in serving:
        _served_versions.add(version)
        MODEL_INFO.labels(version=version).set(1)


def record_parties(states: list[dict[str, Any] | None]) -> None:
    """Per-party health from a readiness probe: reachable (up) and MPC engine connected."""
    for rank, state in enumerate(states):
        PARTY_UP.labels(party=str(rank)).set(1 if state is not None else 0)
        connected = bool(state and state.get("mpc", {}).get("connected", False))
        PARTY_MPC.labels(party=str(rank)).set(1 if connected else 0)


def render() -> tuple[bytes, str]:
    """The exposition text: this process's registry, or every worker's samples in multiprocess mode."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


ASGIApp = Callable[[MutableMapping[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
                   Awaitable[None]]


class RequestMetrics:
    """ASGI middleware: count and time every HTTP request by (method, route template, status).

    Pure ASGI (not BaseHTTPMiddleware) so it sees the status even of streamed answers, and the route that
    FastAPI's router wrote into the scope once the request has been routed.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: MutableMapping[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # an exception that escapes the app is answered 500 by the outer error middleware

        async def send_and_note(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            labels = (method_label(scope.get("method", "")), route_label(scope), str(status))
            REQUESTS.labels(*labels).inc()
            LATENCY.labels(*labels).observe(time.perf_counter() - start)
