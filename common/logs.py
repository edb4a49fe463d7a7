"""Logs of every privface process: one format setting, and a request id that follows a request.

The gateway takes the client's ``X-Request-ID`` when it is a short token (else makes one), returns it in the
response and sends it on each of its calls to the parties; a party takes it from that header. While a request
is handled, every log line carries it (a context variable that a logging filter reads): the gateway's lines,
the party's lines and the party's MPC job lines. ``PRIVFACE_LOG_FORMAT=json`` writes one JSON object per line
(``ts``, ``level``, ``logger``, ``message``, ``request_id``, ``exc`` for a failure), ``text`` (the default)
the usual lines with ``[request_id]``.

The id is an opaque label chosen before anything is computed, so it says nothing about a request's content or
outcome, and nothing that the parties compute or reveal depends on it.
"""
from __future__ import annotations

import contextvars
import copy
import json
import logging
import logging.config
import os
import re
import uuid
from datetime import datetime, timezone
from typing import Any

REQUEST_ID_HEADER = "X-Request-ID"
FORMAT_ENV = "PRIVFACE_LOG_FORMAT"
FORMATS = ("text", "json")
_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")  # a token: safe in a header, a log line and a JSON string
_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("privface_request_id", default=None)


def current_request_id() -> str | None:
    """The id of the request this code is handling (None outside a request)."""
    return _request_id.get()


def accepted_request_id(value: str | None) -> str | None:
    """``value`` if it is a usable id (1-128 letters, digits, ``. _ : -``), else None: a caller cannot put
    arbitrary text, a newline or a huge string into every log line."""
    return value if value and _VALID_ID.match(value) else None


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_id_headers() -> dict[str, str]:
    """The header that carries the current request's id to a party ({} outside a request)."""
    rid = current_request_id()
    return {REQUEST_ID_HEADER: rid} if rid else {}


class RequestIdMiddleware:
    """ASGI middleware: binds the request's id for the whole request (the access log line included).

    ``generate``: the gateway makes an id when the client sent none (or an unusable one) and answers it in the
    ``X-Request-ID`` response header; a party only takes the gateway's.
    """

    def __init__(self, app: Any, generate: bool = True) -> None:
        self.app, self.generate = app, generate

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = dict(scope.get("headers") or []).get(REQUEST_ID_HEADER.lower().encode(), b"")
        rid = accepted_request_id(sent.decode("latin-1")) or (new_request_id() if self.generate else None)
        token = _request_id.set(rid)

        async def send_with_id(message: dict[str, Any]) -> None:
            if rid and self.generate and message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  (REQUEST_ID_HEADER.lower().encode(), rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _request_id.reset(token)


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` ("-" outside a request) to every record, for both formats."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id() or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line; a failure's traceback stays inside its line (``exc``)."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
        entry: dict[str, Any] = {"ts": ts, "level": record.levelname, "logger": record.name,
                                 "message": record.getMessage()}
        rid = getattr(record, "request_id", None) or current_request_id()
        if rid and rid != "-":
            entry["request_id"] = rid
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def log_format(value: str | None = None) -> str:
    """The chosen format (``value``, else PRIVFACE_LOG_FORMAT, else text); an unknown one stops the process."""
    chosen = (value or os.environ.get(FORMAT_ENV) or "text").strip().lower()
    if chosen not in FORMATS:
        raise SystemExit(f"{FORMAT_ENV}={chosen!r}: choose one of {', '.join(FORMATS)}")
    return chosen


def logging_config(fmt: str | None = None, level: str = "INFO") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` (and uvicorn ``log_config``) for a privface process: uvicorn's loggers
    and ours (``app``, ``secure``, ``privface``) on stderr, each line with the request id, in ``fmt``."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {"request_id": {"()": "common.logs.RequestIdFilter"}}
    if log_format(fmt) == "json":
        config["formatters"] = {name: {"()": "common.logs.JsonFormatter"} for name in ("default", "access")}
    else:
        config["formatters"]["default"]["fmt"] = "%(levelprefix)s [%(request_id)s] %(name)s: %(message)s"
        config["formatters"]["access"]["fmt"] = \
            '%(levelprefix)s [%(request_id)s] %(client_addr)s - "%(request_line)s" %(status_code)s'
    for handler in config["handlers"].values():
        handler["filters"] = ["request_id"]
    config["root"] = {"handlers": ["default"], "level": "WARNING"}
    config["loggers"].update({name: {"level": level} for name in ("app", "secure", "privface")})
    return config


def configure_logging(fmt: str | None = None, level: str = "INFO") -> None:
    """Apply ``logging_config`` to this process (processes that do not run uvicorn: the dealer, MPC workers)."""
    logging.config.dictConfig(logging_config(fmt, level))
