"""FastAPI dependencies: the gateway context, a database session, and scope-checked callers."""
from __future__ import annotations

from collections.abc import Callable, Iterator

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.auth import METRICS_SCOPE, Principal, authenticate
from app.context import GatewayContext
from app.db import session_scope
from app.problems import forbidden, unauthorized

_bearer = HTTPBearer(auto_error=False, description="An API key: `pf_<prefix>_<secret>`.")


def get_context(request: Request) -> GatewayContext:
    ctx: GatewayContext = request.app.state.ctx  # set by app/main.py's lifespan
    return ctx


def get_session(ctx: GatewayContext = Depends(get_context)) -> Iterator[Session]:
    """A read session. Writes use `session_scope` in the route, so they commit before the response is sent
    (the teardown of a yield dependency may run after it)."""
    with session_scope(ctx.sessions) as session:
        yield session


def require_scope(scope: str | None, *alternatives: str) -> Callable[..., Principal]:
    """A dependency that authenticates the caller and, when `scope` is given, checks it holds that scope (or
    one of `alternatives`). A metrics-only key passes only where 'metrics' is named (GET /metrics): it is a
    scrape credential, refused 403 on every other route, those open to any key included."""
    accepted = {scope, *alternatives} - {None}

    def dependency(credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
                   ctx: GatewayContext = Depends(get_context)) -> Principal:
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise unauthorized("send `Authorization: Bearer <api key>`")
        with session_scope(ctx.sessions) as session:
            principal = authenticate(session, credentials.credentials, ctx.settings.secret_key)
        if principal is None:
            raise unauthorized("the API key is unknown, revoked or malformed")
        if accepted and not accepted & principal.scopes:
            raise forbidden(f"this endpoint needs the '{scope}' scope; the key has {sorted(principal.scopes)}")
        if not accepted and principal.scopes <= {METRICS_SCOPE}:
            raise forbidden("this key has only the 'metrics' scope: it may scrape GET /metrics and nothing else")
        return principal

    return dependency
