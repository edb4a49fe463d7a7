"""Sealed mode (issue 12), the party's half of the envelope: its X25519 key and the opening of its share.

The SDK (``client/sealed.py``) encrypts each additive share of the features to one party: ephemeral X25519,
HKDF-SHA256 (info binds both public keys), ChaCha20-Poly1305 with associated data naming the party, the key id and
the request (transform, shape, nonce). A party opens only envelopes addressed to it and to its current key; any
change to the ciphertext, the context or the addressee fails authentication (``SealedError``), so the gateway that
relays the envelopes can neither read them nor swap them. The format is written down again in the client (it may
not import this package); tests/test_sealed_box.py checks that the two agree.

The key: ``PRIVFACE_PARTY_SEALED_KEY`` (base64 of 32 bytes) or, when unset, a fresh key per process from the OS
CSPRNG (for tests and `privface run` only: SDKs pin the key's fingerprint out of band, so a key that changes at
each start breaks them; deployments set the variable and publish ``privface sealed-fingerprint``'s output).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

SCHEME = "x25519-hkdf-sha256-chacha20poly1305-v1"
VARIABLES = {"PRIVFACE_PARTY_SEALED_KEY": ("", "Sealed mode: this party's X25519 private key (base64 of 32 bytes) "
                                                "that the SDK encrypts its feature share to; unset: a fresh key "
                                                "per process.")}


class SealedError(ValueError):
    """An envelope that is not for this party, not for its key, or does not authenticate."""


class PartyKey:
    """A party's X25519 key pair for sealed shares."""

    def __init__(self, private: X25519PrivateKey) -> None:
        self._private = private
        self.public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @classmethod
    def generate(cls) -> PartyKey:
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_b64(cls, text: str) -> PartyKey:
        try:
            raw = base64.b64decode(text, validate=True)
            return cls(X25519PrivateKey.from_private_bytes(raw))
        except (binascii.Error, ValueError) as exc:
            raise ValueError("PRIVFACE_PARTY_SEALED_KEY must be base64 of 32 bytes") from exc

    def private_b64(self) -> str:
        raw = self._private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        return base64.b64encode(raw).decode()

    @property
    def public_b64(self) -> str:
        return base64.b64encode(self.public).decode()

    @property
    def key_id(self) -> str:
        return hashlib.sha256(self.public).hexdigest()[:16]

    @property
    def fingerprint(self) -> str:
        """The full SHA-256 of the public key: what the operator publishes and the SDK pins out of band."""
        return hashlib.sha256(self.public).hexdigest()

    def exchange(self, peer_public: bytes) -> bytes:
        return self._private.exchange(X25519PublicKey.from_public_bytes(peer_public))


def associated_data(party: int, kid: str, context: dict[str, Any]) -> bytes:
    """Identical to ``client.sealed.associated_data`` (checked by tests/test_sealed_box.py)."""
    fields = {"party": int(party), "key_id": kid, "transform_id": str(context["transform_id"]),
              "shape": [int(v) for v in context["shape"]], "nonce": str(context["nonce"]),
              "operation": str(context["operation"]), "created_at": int(context["created_at"])}
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def open_share(envelope: dict[str, Any], rank: int, key: PartyKey, context: dict[str, Any]) -> np.ndarray:
    """This party's int64 share from its envelope, shaped as ``context["shape"]``; ``SealedError`` otherwise."""
    if envelope.get("scheme") != SCHEME:
        raise SealedError(f"unknown sealing scheme {envelope.get('scheme')!r}")
    if envelope.get("party") != rank:
        raise SealedError(f"envelope addressed to party {envelope.get('party')!r}, not {rank}")
    if envelope.get("key_id") != key.key_id:
        raise SealedError("envelope sealed to another key (refetch GET /v1/sealed/keys)")
    try:
        epk = base64.b64decode(str(envelope["epk"]), validate=True)
        nonce = base64.b64decode(str(envelope["nonce"]), validate=True)
        ciphertext = base64.b64decode(str(envelope["ciphertext"]), validate=True)
        info = b"privface sealed share v1|" + epk + key.public
        aead_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(key.exchange(epk))
        plaintext = ChaCha20Poly1305(aead_key).decrypt(nonce, ciphertext, associated_data(rank, key.key_id, context))
    except (KeyError, binascii.Error, ValueError, InvalidTag) as exc:
        raise SealedError("envelope does not authenticate for this party and request") from exc
    shape = tuple(int(v) for v in context["shape"])
    if len(plaintext) != 8 * int(np.prod(shape, dtype=np.int64)):
        raise SealedError("share size differs from the request's shape")
    return np.frombuffer(plaintext, dtype="<i8").astype(np.int64).reshape(shape)


def party_key_from_env(environ: dict[str, str] | None = None) -> PartyKey:
    """The party's sealed-mode key: ``PRIVFACE_PARTY_SEALED_KEY`` if set, else a fresh one (see the docstring)."""
    import os

    text = (environ if environ is not None else os.environ).get("PRIVFACE_PARTY_SEALED_KEY", "").strip()
    return PartyKey.from_b64(text) if text else PartyKey.generate()
