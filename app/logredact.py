"""Secrets never reach the gateway's logs: a logging filter that masks them in every record.

A client that puts its API key in the URL (`?api_key=...`) is refused, but uvicorn's access log would
still write the whole request line. The filter masks the values of secret-looking query parameters and
anything shaped like a privface API key or a bearer credential, in the message and in its arguments
(the access log passes the path as an argument). `log_config()` is the gateway's logging configuration with
this filter on every handler, so every line the gateway process writes passes through it.
"""
from __future__ import annotations

import logging
import re
from typing import Any

from common.logs import logging_config

MASK = "[REDACTED]"
SECRET_PARAMS = ("api_key", "apikey", "api-key", "key", "token", "access_token", "refresh_token", "id_token",
                 "secret", "client_secret", "password", "passwd", "auth", "authorization", "signature", "sig")
_QUERY_SECRET = re.compile(r"(?i)([?&;](?:" + "|".join(re.escape(p) for p in SECRET_PARAMS) + r")=)[^&;#\s\"']*")
_API_KEY = re.compile(r"\b(pf_[0-9a-f]{4,32}_)[A-Za-z0-9_\-]+")
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=\-]+")


def redact(text: str) -> str:
    """`text` with secret query values, API-key secrets and bearer credentials replaced by [REDACTED]."""
    text = _QUERY_SECRET.sub(lambda m: m.group(1) + MASK, text)
    text = _BEARER.sub(lambda m: m.group(1) + MASK, text)
    return _API_KEY.sub(lambda m: m.group(1) + MASK, text)


def _redact_value(value: Any) -> Any:
    return redact(value) if isinstance(value, str) else value


class RedactSecrets(logging.Filter):
    """Rewrites each record's message and string arguments in place; never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_redact_value(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: _redact_value(v) for k, v in record.args.items()}
        return True


def log_config(fmt: str | None = None) -> dict[str, Any]:
    """The gateway's logging configuration (``common.logs.logging_config``: ``fmt`` text or json, the request id
    on every line), plus the redacting filter on every handler, so every line the gateway writes is masked."""
    config = logging_config(fmt)
    config["filters"]["redact_secrets"] = {"()": "app.logredact.RedactSecrets"}
    for handler in config["handlers"].values():
        handler["filters"] = [*handler.get("filters", []), "redact_secrets"]
    return config
