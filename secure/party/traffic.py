"""An optional record of the calls a party receives: method, path and request body size, one line each.

What an observer at a party (or on its link) sees of the gateway's traffic, without any content. The
outcome-independence tests (``tests/test_gateway_traffic_revocation.py``) read it to check that a match
and a non-match cause the same sequence of calls; an operator can use it as a size-only access record.
Off unless ``PRIVFACE_PARTY_TRAFFIC_LOG`` names a file.
"""
from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

from fastapi import FastAPI, Request, Response


def install_traffic_log(app: FastAPI, path: str | None) -> None:
    """Append ``METHOD PATH BYTES`` for every request to ``path`` (nothing when ``path`` is empty)."""
    if not path:
        return
    target = Path(path)
    lock = threading.Lock()

    @app.middleware("http")
    async def _record(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        size = request.headers.get("content-length", "0")
        with lock, target.open("a") as out:
            out.write(f"{request.method} {request.url.path} {size}\n")
        return await call_next(request)
