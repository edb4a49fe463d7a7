"""The API's own documentation: Swagger UI and ReDoc served offline, and error responses in the OpenAPI.

The UI assets (JS/CSS) come from the `fastapi-offline` wheel and are served by the gateway itself, so
`/docs` works on a machine without internet access. Every documented error is an RFC 9457 problem
(`application/problem+json`, schema `Problem`) with an example built by the same code that raises it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import fastapi_offline
from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from app.problems import (PROBLEM_BASE, PROBLEM_MEDIA_TYPE, Problem, forbidden, invalid_features, not_found,
                          unauthorized, unavailable)
from app.services.abuse import subject_locked, too_many_requests
from app.services.features import no_face

STATIC_URL = "/static/docs"
STATIC_DIR = Path(fastapi_offline.__file__).parent / "static"


class ProblemOut(BaseModel):
    """An RFC 9457 problem: `type` names the problem (stable), `detail` explains this occurrence."""

    model_config = ConfigDict(title="Problem", extra="allow")
    type: str = Field(description=f"a URI under {PROBLEM_BASE}; stable, one per kind of problem")
    title: str
    status: int
    detail: str
    instance: str = Field(description="the request path")
    errors: list[dict[str, Any]] | None = Field(None, description="validation errors: loc and msg of each")


def problem_response(description: str, *examples: Problem, path: str = "/v1/...") -> dict[str, Any]:
    """One entry of a route's `responses`: problem+json with the Problem schema and real examples."""
    content: dict[str, Any] = {"schema": {"$ref": "#/components/schemas/Problem"}}
    if examples:
        content["examples"] = {problem.slug: {"summary": problem.title, "value": problem.body(path)}
                               for problem in examples}
    return {"description": description, "content": {PROBLEM_MEDIA_TYPE: content}}


SUBJECT = "sub_5f0c3b1e9a7d4c2b8e6f1a0d9c8b7a65"
UNAUTHORIZED = unauthorized("the API key is unknown, revoked or malformed")
FORBIDDEN = forbidden("this endpoint needs the 'enroll' scope; the key has ['verify']")
BAD_BODY = Problem(400, "bad-request", "There was an error parsing the body", "the body is not valid UTF-8")
VALIDATION = Problem(422, "validation-error", "The request is not valid", "body.foo: Extra inputs are not permitted",
                     errors=[{"loc": ["body", "foo"], "msg": "Extra inputs are not permitted"}])
TOO_LARGE = Problem(413, "payload-too-large", "Request body too large", "the limit is 262144 bytes")
UNAVAILABLE = unavailable("enrollment not stored: party 1 did not answer; nothing was kept")
RATE_LIMITED = too_many_requests("the API key's verify budget", 12)
SUBJECT_NOT_FOUND = not_found("subject", SUBJECT)
BAD_SHAPE = invalid_features("shape [3, 14, 14] does not match the transform's (73, 14, 14)", "invalid-shape")
UNKNOWN_TRANSFORM = invalid_features("transform dct8-nope/0000000000000000 is not served", "unknown-transform")
NO_FACE = no_face(-41.3, 2.1)  # e.g. the features of a grey frame (PRIVFACE_QUALITY_GATE, docs/quality_gate.md)
REPLAYED = Problem(409, "replayed-nonce", "Payload already used",
                   "This feature payload's nonce was seen before; make a fresh payload.")
NOT_ENROLLED = Problem(409, "subject-not-enrolled", "No template to compare with",
                       f"subject {SUBJECT!r} has no enrollment under a served model and the tenant's current key; "
                       "enroll it first")
LOCKED = subject_locked(SUBJECT, 600)


def auth_errors(scope: str | None = None) -> dict[int | str, dict[str, Any]]:
    """401 for every authenticated route; 403 when it needs a scope, and for a metrics-only key everywhere but
    GET /metrics."""
    errors: dict[int | str, dict[str, Any]] = {401: problem_response("Missing or invalid API key (`Authorization: Bearer <key>`)", UNAUTHORIZED)}
    errors[403] = problem_response(f"The API key lacks the '{scope}' scope" if scope is not None else
                                   "The API key has only the 'metrics' scope (it may scrape GET /metrics only)",
                                   FORBIDDEN)
    return errors


def body_errors(*semantic: Problem) -> dict[int | str, dict[str, Any]]:
    """The errors of any route with a JSON body: unparseable (400), too large (413), invalid (422)."""
    return {400: problem_response("The body is not UTF-8 or could not be read", BAD_BODY),
            413: problem_response("The body exceeds PRIVFACE_MAX_BODY_BYTES", TOO_LARGE),
            422: problem_response("The body does not match the schema (unknown fields and wrong types are "
                                  "refused), or its features are invalid", VALIDATION, *semantic)}


def install_docs(app: FastAPI) -> None:
    """Serve /docs and /redoc from local assets, and add the Problem schema to /openapi.json.

    The FastAPI app must be created with docs_url=None and redoc_url=None.
    """
    app.mount(STATIC_URL, StaticFiles(directory=STATIC_DIR), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=openapi_url, title=f"{app.title} - Swagger UI",
                                   oauth2_redirect_url=app.swagger_ui_oauth2_redirect_url,
                                   swagger_js_url=f"{STATIC_URL}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{STATIC_URL}/swagger-ui.css",
                                   swagger_favicon_url=f"{STATIC_URL}/favicon.png")

    @app.get(app.swagger_ui_oauth2_redirect_url or "/docs/oauth2-redirect", include_in_schema=False)
    def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url=openapi_url, title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{STATIC_URL}/redoc.standalone.js",
                              redoc_favicon_url=f"{STATIC_URL}/favicon.png", with_google_fonts=False)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            _replace_fastapi_422s(schema)
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            schemas["Problem"] = ProblemOut.model_json_schema(ref_template="#/components/schemas/{model}")
            for unused in ("HTTPValidationError", "ValidationError"):
                schemas.pop(unused, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _replace_fastapi_422s(schema: dict[str, Any]) -> None:
    """FastAPI documents a 422 `HTTPValidationError` (application/json) on every route with parameters;
    the gateway answers those with a problem, so document that instead."""
    for item in schema.get("paths", {}).values():
        for operation in item.values():
            response = operation.get("responses", {}).get("422", {})
            if "application/json" in response.get("content", {}):
                operation["responses"]["422"] = problem_response("The request is not valid", VALIDATION)
