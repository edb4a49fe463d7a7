"""The gateway's problems: the RFC 9457 errors its routes raise, and what its 500 says.

The format itself (`Problem`, the handlers) is common/problems.py, shared with the parties; it is re-exported
here so that the gateway's modules keep one place to import their errors from."""
from __future__ import annotations

from fastapi import FastAPI

from common import problems as common
from common.problems import PROBLEM_BASE, PROBLEM_MEDIA_TYPE, Problem

__all__ = ["PROBLEM_BASE", "PROBLEM_MEDIA_TYPE", "Problem", "forbidden", "install_problem_handlers",
           "invalid_features", "not_found", "unauthorized", "unavailable"]
INTERNAL_DETAIL = "The request failed unexpectedly; see the server log."


def install_problem_handlers(app: FastAPI) -> None:
    """Every error of the gateway as problem+json (uvicorn logs an unexpected one's traceback itself)."""
    common.install_problem_handlers(app, INTERNAL_DETAIL)


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
