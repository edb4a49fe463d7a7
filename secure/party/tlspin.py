"""Pinning the gateway's client certificate at a party (mTLS accepts any certificate of the CA; a pin does not).

uvicorn does not put the peer certificate in the ASGI scope, so ``PeerCertH11Protocol`` (an h11 protocol
subclass) reads it once per connection, after the TLS handshake, and exposes its SHA-256 fingerprint to
the app as ``request.state.peer_cert_sha256``. The party's auth dependency compares it with the pin on
every request (constant time), next to the per-link bearer token.
"""
from __future__ import annotations

import asyncio
import hashlib

from uvicorn.protocols.http.h11_impl import H11Protocol


def cert_fingerprint(der: bytes) -> str:
    """The pin format: lowercase hex SHA-256 of the certificate's DER bytes."""
    return hashlib.sha256(der).hexdigest()


def normalize_pin(pin: str) -> str:
    """Accept 'AB:CD:..', 'sha256:abcd..' or plain hex; return lowercase hex without separators."""
    value = pin.strip().lower().removeprefix("sha256:").replace(":", "")
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ValueError("a certificate pin is the 64-hex-digit SHA-256 of the certificate (DER)")
    return value


class PeerCertH11Protocol(H11Protocol):
    """h11 protocol that records the TLS peer certificate's fingerprint in the per-connection app state."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        # a per-connection copy: the shared lifespan state must not carry one client's identity to another
        self.app_state = {**self.app_state, "peer_cert_sha256": cert_fingerprint(der) if der else None}
