"""Whether a party may serve with its configuration, and uvicorn's options for it (TLS, keep-alive).

Off loopback a party needs a non-development token, HTTPS, mutual TLS and the gateway's pin: plain HTTP or a token
anyone can read in the source would hand the gateway's link to whoever reaches it. ``check_deployment`` runs before
the party touches its database, so an unsafe configuration changes nothing.
"""
from __future__ import annotations

import ipaddress
import ssl
from typing import Any

from secure.party.api import KEEP_ALIVE_S
from secure.party.settings import PartySettings
from secure.party.tlspin import PeerCertH11Protocol, normalize_pin


def uvicorn_ssl_options(settings: PartySettings) -> dict[str, Any]:
    """uvicorn's TLS options; with a CA, clients need a certificate, and a pin names the one accepted."""
    if not settings.ssl_certfile:
        return {}
    opts: dict[str, Any] = {"ssl_certfile": settings.ssl_certfile, "ssl_keyfile": settings.ssl_keyfile}
    if settings.ssl_ca_certs:
        opts.update(ssl_ca_certs=settings.ssl_ca_certs, ssl_cert_reqs=ssl.CERT_REQUIRED)
    if settings.gateway_cert_sha256:
        opts["http"] = PeerCertH11Protocol  # exposes the client certificate's fingerprint to the token check
    return opts


def uvicorn_options(settings: PartySettings) -> dict[str, Any]:
    """Everything a party's uvicorn gets besides the app and address: the TLS options and the keep-alive
    timeout the gateway's connection pool is sized against (``api.KEEP_ALIVE_S``, ``secure/partylink.py``)."""
    return {"timeout_keep_alive": KEEP_ALIVE_S, **uvicorn_ssl_options(settings)}


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def deployment_problems(settings: PartySettings) -> list[str]:
    """What makes this configuration unsafe to serve (empty: fine).

    On loopback only inconsistencies are refused (a pin needs mTLS; a pin must be well formed).
    """
    problems = []
    if settings.gateway_cert_sha256:
        try:
            normalize_pin(settings.gateway_cert_sha256)
        except ValueError as exc:
            problems.append(f"PRIVFACE_PARTY_GATEWAY_CERT_SHA256: {exc}")
        if not (settings.ssl_certfile and settings.ssl_ca_certs):
            problems.append("a gateway pin needs TLS with a client CA (PRIVFACE_PARTY_SSL_CERTFILE, _SSL_CA_CERTS)")
    if _is_loopback(settings.host):
        return problems
    if settings.has_dev_token():
        problems.append(f"the development token is refused off loopback (set PRIVFACE_PARTY{settings.rank}_TOKEN)")
    if not (settings.ssl_certfile and settings.ssl_keyfile):
        problems.append("plain HTTP is refused off loopback (set PRIVFACE_PARTY_SSL_CERTFILE and _SSL_KEYFILE)")
    if not settings.ssl_ca_certs:
        problems.append("mutual TLS is required off loopback (set PRIVFACE_PARTY_SSL_CA_CERTS)")
    if not settings.gateway_cert_sha256:
        problems.append("the gateway's certificate must be pinned off loopback (PRIVFACE_PARTY_GATEWAY_CERT_SHA256)")
    return problems


def check_deployment(settings: PartySettings) -> None:
    """Refuse to start (SystemExit) on any of ``deployment_problems``; nothing is touched before."""
    problems = deployment_problems(settings)
    if problems:
        raise SystemExit(f"party {settings.rank} refuses to serve on {settings.host}: " + "; ".join(problems))
