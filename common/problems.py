"""RFC 9457 problem details, the one error format of the gateway's public API and of the parties' internal
API: every error either side returns is a `Problem`, sent as application/problem+json.

Shared by both so that the two cannot drift; each side adds only its own shorthands (app/problems.py) and says
what its 500 tells the caller and where it is logged.
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

PROBLEM_BASE = "https://privface.dev/problems/"
PROBLEM_MEDIA_TYPE = "application/problem+json"
HTTP_SLUGS = {400: "bad-request", 404: "not-found", 405: "method-not-allowed", 413: "payload-too-large"}


class Problem(Exception):
    """An error with a stable `slug` (the problem type), an HTTP status and a human-readable detail."""

    def __init__(self, status: int, slug: str, title: str, detail: str = "", headers: dict[str, str] | None = None,
                 **extra: Any) -> None:
        super().__init__(detail or title)
        self.status, self.slug, self.title, self.detail = status, slug, title, detail
        self.headers = headers or {}
        self.extra = extra

    def body(self, instance: str) -> dict[str, Any]:
        body = {"type": PROBLEM_BASE + self.slug, "title": self.title, "status": self.status,
                "detail": self.detail, "instance": instance}
        body.update(self.extra)
        return body


def problem_response(problem: Problem, instance: str) -> JSONResponse:
    return JSONResponse(problem.body(instance), status_code=problem.status, headers=problem.headers,
                        media_type=PROBLEM_MEDIA_TYPE)


def validation_problem(exc: RequestValidationError) -> Problem:
    """A 422 naming where and why the request is invalid; never echoes the input (it may hold a share)."""
    errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.errors()]
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    detail = f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
    return Problem(422, "validation-error", "The request is not valid", detail, errors=errors)


def http_problem(exc: StarletteHTTPException) -> Problem:
    """Starlette's own errors (unknown route, wrong method, ...) with their headers (e.g. a 405's Allow)."""
    slug = HTTP_SLUGS.get(exc.status_code, "http-error")
    return Problem(exc.status_code, slug, str(exc.detail), str(exc.detail), headers=dict(exc.headers or {}))


def install_problem_handlers(app: FastAPI, internal_detail: str, log: logging.Logger | None = None) -> None:
    """Turn every error, including FastAPI's own validation and routing errors, into problem+json.

    An unexpected exception becomes a 500 with `internal_detail`; with `log`, its type (never its message,
    which may quote data) is logged there."""

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return problem_response(validation_problem(exc), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem_response(http_problem(exc), request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        if log is not None:
            log.error("internal error on %s: %s", request.url.path, type(exc).__name__)
        return problem_response(Problem(500, "internal-error", "Internal error", internal_detail), request.url.path)
