"""A small scripted gateway for the client SDK tests: a real FastAPI app served by uvicorn on a free port.

It speaks the gateway's REST contract (bearer auth, problem+json errors, /v1/transforms) with canned
answers, and can be told to fail the next requests with 503 so that retries are exercised over real
HTTP. It records every request it receives.
"""
from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from inference.transform import TransformSpec, default_spec
from tests.conftest import free_port

API_KEY = "pk_test_secret"
PROBLEM = "application/problem+json"


@dataclass
class GatewayScript:
    """What the scripted gateway does next; tests change it between calls."""

    spec: TransformSpec
    advertised_hash: str | None = None  # lie about params_hash to test the SDK's check
    fail_503: int = 0  # answer this many next requests with 503
    retry_after: str | None = "0"
    status_override: int | None = None  # answer every request with this error status
    fail_after: int | None = None  # after this many requests, answer 422
    plain_text_error: bool = False
    delay_s: float = 0.0  # answer this late (read timeouts)
    match_subject: str | None = None
    requests: list[tuple[str, str, Any]] = field(default_factory=list)

    def reset(self) -> None:
        """Back to the defaults: one server serves a whole test module."""
        self.__dict__.update(GatewayScript(spec=self.spec).__dict__)


def problem(status: int, slug: str, title: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"type": f"https://privface.dev/problems/{slug}", "title": title, "status": status, "detail": detail}
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def build_app(script: GatewayScript) -> FastAPI:
    app = FastAPI()

    @app.middleware("http")
    async def gate(request: Request, call_next):
        body = await request.body()
        script.requests.append((request.method, request.url.path, body))
        await asyncio.sleep(script.delay_s)
        if request.headers.get("authorization") != f"Bearer {API_KEY}":
            return problem(401, "unauthorized", "Missing or invalid API key", "bad key", {"WWW-Authenticate": "Bearer"})
        if script.fail_503 > 0:
            script.fail_503 -= 1
            headers = {"Retry-After": script.retry_after} if script.retry_after is not None else None
            return problem(503, "service-unavailable", "A secure-computation party is unavailable", "party 1 down",
                           headers)
        if script.plain_text_error:
            return PlainTextResponse("upstream exploded", status_code=502)
        if script.fail_after is not None and len(script.requests) > script.fail_after:
            script.status_override = 422
        if script.status_override:
            return problem(script.status_override, "scripted", "Scripted error", f"status {script.status_override}")
        return await call_next(request)

    @app.get("/v1/transforms")
    def transforms() -> list[dict]:
        spec = script.spec
        return [{"transform_id": spec.transform_id, "params_hash": script.advertised_hash or spec.params_hash,
                 "model_version": "v0", "spec": spec.to_dict()}]

    @app.post("/v1/subjects", status_code=201)
    async def create_subject(request: Request) -> dict:
        body = await request.json()
        return {"id": "sub_1", "external_id": body.get("external_id"), "created_at": "2026-11-23T10:00:00Z",
                "enrollments": []}

    @app.get("/v1/subjects/{subject_id}")
    def get_subject(subject_id: str):
        if subject_id != "sub_1":
            return problem(404, "subject-not-found", "Unknown subject", f"No subject with id {subject_id!r}.")
        return {"id": "sub_1", "external_id": None, "created_at": "2026-11-23T10:00:00Z", "enrollments": []}

    @app.delete("/v1/subjects/{subject_id}")
    def delete_subject(subject_id: str) -> Response:
        return Response(status_code=204)

    def unknown_transform(features: dict) -> JSONResponse | None:
        if features["params_hash"] == script.spec.params_hash:
            return None
        return problem(422, "unknown-transform", "Invalid feature payload", "transform is not served")

    @app.post("/v1/subjects/{subject_id}/enrollments", status_code=201)
    async def enroll(subject_id: str, request: Request):
        features = (await request.json())["features"]
        if refused := unknown_transform(features):
            return refused
        return {"id": f"enr_{len(script.requests)}", "subject_id": subject_id, "model_version": "v0",
                "created_at": "2026-11-23T10:00:00Z", "epsilon": features["epsilon"]}

    @app.post("/v1/verify")
    async def verify(request: Request):
        body = await request.json()
        if refused := unknown_transform(body["features"]):
            return refused
        return {"match": body["subject_id"] == script.match_subject, "model_version": "v0", "request_id": "req_1"}

    @app.post("/v1/identify")
    async def identify(request: Request):
        if refused := unknown_transform((await request.json())["features"]):
            return refused
        subject = script.match_subject
        return {"match": subject is not None, "subject_id": subject, "model_version": "v0", "request_id": "req_2"}

    return app


class ScriptedGateway:
    """Runs build_app(script) with uvicorn in a daemon thread; `url` is its base URL."""

    def __init__(self, script: GatewayScript) -> None:
        self.script = script
        self.port = free_port()
        config = uvicorn.Config(build_app(script), host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ScriptedGateway":
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the scripted gateway did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=5)


@pytest.fixture(scope="module")
def gateway() -> Iterator[ScriptedGateway]:
    """A scripted gateway with the default transform, one per test module (import it to use it)."""
    server = ScriptedGateway(GatewayScript(spec=default_spec())).start()
    yield server
    server.stop()
