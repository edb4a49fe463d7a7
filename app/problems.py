"""RFC 9457 problem details: every error the API returns is one of these, as application/problem+json."""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

PROBLEM_BASE = "https://privface.dev/problems/"
PROBLEM_MEDIA_TYPE = "application/problem+json"


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


# Shorthands for the problems the routes raise.
def unauthorized(detail: str) -> Problem:
    return Problem(401, "unauthorized", "Missing or invalid API key", detail, headers={"WWW-Authenticate": "Bearer"})


def forbidden(detail: str) -> Problem:
    return Problem(403, "forbidden", "The API key lacks a required scope", detail)


def not_found(what: str, ident: str) -> Problem:
    return Problem(404, f"{what}-not-found", f"Unknown {what}", f"No {what} with id {ident!r}.")


def invalid_features(detail: str, slug: str = "invalid-features") -> Problem:
    return Problem(422, slug, "Invalid feature payload", detail)


def unavailable(detail: str, retry_after_s: int = 2) -> Problem:
    return Problem(503, "service-unavailable", "A secure-computation party is unavailable", detail,
                   headers={"Retry-After": str(retry_after_s)})


def install_problem_handlers(app: FastAPI) -> None:
    """Turn every error, including FastAPI's own validation and routing errors, into problem+json."""

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.errors()]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        detail = f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
        problem = Problem(422, "validation-error", "The request is not valid", detail, errors=errors)
        return problem_response(problem, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        slug = {400: "bad-request", 404: "not-found", 405: "method-not-allowed",
                413: "payload-too-large"}.get(exc.status_code, "http-error")
        # the exception's headers (e.g. a 405's Allow) are part of the answer
        problem = Problem(exc.status_code, slug, str(exc.detail), str(exc.detail), headers=dict(exc.headers or {}))
        return problem_response(problem, request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        problem = Problem(500, "internal-error", "Internal error", "The request failed unexpectedly; see the server log.")
        return problem_response(problem, request.url.path)
