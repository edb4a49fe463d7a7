"""RFC 9457 problem+json for the party's internal API (the party does not import the gateway)."""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

PROBLEM_BASE = "https://privface.dev/problems/"
PROBLEM_MEDIA_TYPE = "application/problem+json"
log = logging.getLogger("privface.party")


class PartyProblem(Exception):
    def __init__(self, status: int, slug: str, title: str, detail: str = "", headers: dict[str, str] | None = None,
                 **extra: Any) -> None:
        super().__init__(detail or title)
        self.status, self.slug, self.title, self.detail = status, slug, title, detail
        self.headers = headers or {}
        self.extra = extra


def problem_response(status: int, slug: str, title: str, detail: str, instance: str,
                     headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    body = {"type": PROBLEM_BASE + slug, "title": title, "status": status, "detail": detail, "instance": instance}
    body.update(extra)
    return JSONResponse(body, status_code=status, headers=headers or {}, media_type=PROBLEM_MEDIA_TYPE)


def install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(PartyProblem)
    async def _problem(request: Request, exc: PartyProblem) -> JSONResponse:
        return problem_response(exc.status, exc.slug, exc.title, exc.detail, request.url.path, exc.headers,
                                **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        # never echo the input back: it may hold a share
        errors = [{"loc": [str(p) for p in e.get("loc", ())], "msg": e.get("msg", "")} for e in exc.errors()]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        return problem_response(422, "validation-error", "The request is not valid",
                                f"{'.'.join(first['loc'])}: {first['msg']}", request.url.path, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        slug = {404: "not-found", 405: "method-not-allowed", 413: "payload-too-large"}.get(exc.status_code, "http-error")
        return problem_response(exc.status_code, slug, str(exc.detail), str(exc.detail), request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error on %s: %s", request.url.path, type(exc).__name__)
        return problem_response(500, "internal-error", "Internal error", "The party failed.", request.url.path)
