"""Request-size limit as ASGI middleware: a body over the limit gets a 413 problem before any parsing.

A declared Content-Length is checked before the body is read (the server then enforces that length).
A body without one (chunked transfer encoding) is read here, up to the limit, before the app sees it:
raising from inside the app's `receive` would not work, because FastAPI turns any error while reading
the body into a 400.
"""
from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.problems import PROBLEM_BASE, PROBLEM_MEDIA_TYPE


class BodySizeLimit:
    """``max_bytes`` for every route; ``sealed_max_bytes`` (when larger) for the sealed-mode routes, whose bodies are
    two envelopes of int64 shares (uniform: they do not compress)."""

    def __init__(self, app: ASGIApp, max_bytes: int, sealed_max_bytes: int = 0) -> None:
        self.app, self.max_bytes, self.sealed_max_bytes = app, max_bytes, max(max_bytes, sealed_max_bytes)

    def limit(self, scope: Scope) -> int:
        return self.sealed_max_bytes if str(scope.get("path", "")).startswith("/v1/sealed/") else self.max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit():
            if int(declared) > self.limit(scope):
                await self._reject(scope, send)
            else:
                await self.app(scope, receive, send)
            return
        try:
            body = await self._read_within_limit(receive, self.limit(scope))
        except _ClientGone:
            return
        if body is None:
            await self._reject(scope, send)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read_within_limit(self, receive: Receive, limit: int) -> bytes | None:
        """The whole body, or None as soon as it exceeds the limit."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise _ClientGone()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _reject(self, scope: Scope, send: Send) -> None:
        body = json.dumps({"type": PROBLEM_BASE + "payload-too-large", "title": "Request body too large",
                           "status": 413, "detail": f"the limit is {self.limit(scope)} bytes",
                           "instance": scope.get("path", "")}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", PROBLEM_MEDIA_TYPE.encode()),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands the app the body already read, then defers to the server's."""
    pending = True

    async def replay() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class _ClientGone(Exception):
    """The client disconnected before its body was complete: there is no one left to answer."""
