"""Sealed mode (issue 12), the SDK's half: split the features into two additive shares, one sealed to each party.

The noised features (float) are encoded in CrypTen's fixed point (x * 2^16 rounded, int64, i.e. Z_2^64) and
split as ``s0`` uniform from ``os.urandom`` and ``s1 = x - s0 mod 2^64``: either share alone is uniform and says
nothing about the face. Each share is encrypted to one party's X25519 public key (published through the gateway,
``GET /v1/sealed/keys``): a fresh ephemeral key per share and request, HKDF-SHA256 of the Diffie-Hellman secret,
ChaCha20-Poly1305 with associated data that binds the party, its key id, the transform, the shape and the request
nonce, so the gateway relays ciphertexts it can neither read nor swap between parties or requests. The keys are
accepted only if their fingerprints equal the ones pinned out of band (``pinned_keys``): the gateway relays them
but must not be able to substitute its own.

The party's side (``secure/sealed_box.py``) must derive the same key and associated data; this package may not
import ``secure`` (tests/test_import_rules.py), so the format is written down twice and tests/test_sealed_box.py
checks that a share sealed here opens there.
"""
from __future__ import annotations

import base64
import hashlib
import json
import math
import os
from datetime import datetime, timezone
from typing import Any, TypedDict

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

SCHEME = "x25519-hkdf-sha256-chacha20poly1305-v1"
PRECISION_BITS = 16  # CrypTen's encoder: what the parties' MPC reads the shares as
MAX_ABS = float(2**47)  # beyond this, x * 2^16 leaves the int64 range with no headroom


class Envelope(TypedDict):
    """One party's share, encrypted to that party."""

    scheme: str
    party: int
    key_id: str
    epk: str
    nonce: str
    ciphertext: str


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def key_id(public_key: bytes) -> str:
    """A party key's short name (first 16 hex digits of its SHA-256), bound into the associated data."""
    return hashlib.sha256(public_key).hexdigest()[:16]


def associated_data(party: int, kid: str, context: dict[str, Any]) -> bytes:
    """What the ciphertext is bound to: the party, its key, and the request (transform, shape, nonce, the operation
    enroll/verify/identify and created_at in Unix seconds), so a party can refuse a replay, a stale envelope, or
    an enrollment resent as a probe (secure/party/nonces.py)."""
    fields = {"party": int(party), "key_id": kid, "transform_id": str(context["transform_id"]),
              "shape": [int(v) for v in context["shape"]], "nonce": str(context["nonce"]),
              "operation": str(context["operation"]), "created_at": int(context["created_at"])}
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def derive_key(shared: bytes, epk: bytes, party_public: bytes) -> bytes:
    """The per-share AEAD key from the X25519 secret, bound to both public keys."""
    info = b"privface sealed share v1|" + epk + party_public
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def encode_fixed(features: np.ndarray) -> np.ndarray:
    """Features as int64 fixed point with 16 fractional bits (nearest), CrypTen's ring encoding."""
    array = np.asarray(features, dtype=np.float64)
    if not np.all(np.isfinite(array)) or (array.size and float(np.max(np.abs(array))) >= MAX_ABS):
        raise ValueError("features must be finite and within the fixed-point range")
    return np.rint(array * (1 << PRECISION_BITS)).astype(np.int64)


def split_shares(encoded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two additive shares mod 2^64; the first is uniform from os.urandom (never a numpy generator)."""
    values = np.ascontiguousarray(encoded, dtype=np.int64)
    first = np.frombuffer(os.urandom(8 * values.size), dtype="<i8").astype(np.int64).reshape(values.shape)
    second = (values.view(np.uint64) - first.view(np.uint64)).view(np.int64)
    return first, second


def seal_share(share: np.ndarray, party: int, party_public_b64: str, context: dict[str, Any]) -> Envelope:
    """Encrypt one int64 share to one party (a fresh ephemeral key for every call)."""
    party_public = base64.b64decode(party_public_b64, validate=True)
    ephemeral = X25519PrivateKey.generate()  # the OS CSPRNG, through OpenSSL
    epk = ephemeral.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    key = derive_key(ephemeral.exchange(X25519PublicKey.from_public_bytes(party_public)), epk, party_public)
    nonce = os.urandom(12)
    kid = key_id(party_public)
    plaintext = np.ascontiguousarray(share, dtype="<i8").tobytes()
    ciphertext = ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated_data(party, kid, context))
    return Envelope(scheme=SCHEME, party=party, key_id=kid, epk=_b64(epk), nonce=_b64(nonce),
                    ciphertext=_b64(ciphertext))


def seal_features(features: np.ndarray, party_keys: dict[int, str], context: dict[str, Any]) -> list[Envelope]:
    """The features as two sealed shares, [party 0's, party 1's]. ``party_keys``: rank -> base64 X25519 public
    key (from ``GET /v1/sealed/keys``); ``context``: transform_id, shape, nonce of this request."""
    if sorted(party_keys) != [0, 1]:
        raise ValueError("sealed mode needs the public keys of party 0 and party 1")
    if list(np.shape(features)) != [int(v) for v in context["shape"]]:
        raise ValueError("the features' shape differs from the request's")
    shares = split_shares(encode_fixed(features))
    return [seal_share(shares[rank], rank, party_keys[rank], context) for rank in (0, 1)]


def fingerprint(public_key: bytes) -> str:
    """A party key's fingerprint (all 64 hex digits of its SHA-256): what the operator publishes out of band and
    the SDK pins (``PRIVFACE_SDK_SEALED_KEY_PINS``); the party prints it (``privface sealed-fingerprint``)."""
    return hashlib.sha256(public_key).hexdigest()


def parse_pins(text: str) -> dict[int, str]:
    """``"<party 0 fingerprint>,<party 1 fingerprint>"`` as rank -> fingerprint; ValueError if malformed."""
    parts = [part.strip().lower() for part in text.split(",")]
    if len(parts) != 2 or any(len(p) != 64 or any(c not in "0123456789abcdef" for c in p) for p in parts):
        raise ValueError("sealed key pins must be two SHA-256 fingerprints (64 hex digits each), "
                         "party 0's then party 1's, separated by a comma")
    return {0: parts[0], 1: parts[1]}


def pinned_keys(entries: list[dict[str, Any]], pins: dict[int, str]) -> dict[int, str]:
    """The parties' keys from ``GET /v1/sealed/keys`` (rank -> base64 public key), accepted only if each key's
    fingerprint equals the one pinned for its rank out of band: the gateway relays the keys but cannot choose
    them (a key it holds itself would let it open both shares)."""
    keys: dict[int, str] = {}
    for entry in entries:
        rank, public = int(entry["rank"]), str(entry["public_key"])
        raw = base64.b64decode(public, validate=True)
        if entry.get("scheme") != SCHEME or entry.get("key_id") != key_id(raw):
            raise ValueError(f"party {rank}'s sealed key is not a {SCHEME} key matching its key id")
        if rank not in pins or fingerprint(raw) != pins[rank]:
            raise ValueError(f"party {rank}'s sealed key does not match its pinned fingerprint "
                             "(PRIVFACE_SDK_SEALED_KEY_PINS / --sealed-pins); refusing to seal to it")
        keys[rank] = public
    if sorted(keys) != [0, 1]:
        raise ValueError("the gateway must publish the sealed keys of party 0 and party 1")
    return keys


OPERATIONS = ("enroll", "verify", "identify")


def unix_seconds(created_at: str) -> int:
    """A payload's ISO 8601 ``created_at`` as whole Unix seconds (floor): the form bound into the envelope, which
    the gateway, having parsed the same string, relays to the parties unchanged."""
    when = datetime.fromisoformat(created_at.replace("Z", "+00:00"))
    return math.floor((when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp())


def sealed_payload(payload: dict[str, Any], party_keys: dict[int, str], operation: str) -> dict[str, Any]:
    """A gateway-mode feature payload (``client.features``) as sealed mode's: the same noised features (decoded from
    their float16 encoding, so both modes embed identical values), split and sealed under a fresh nonce; the
    header (transform, shape, ε, time) is copied, the features themselves never leave in the clear."""
    shape = [int(v) for v in payload["shape"]]
    features = np.frombuffer(base64.b64decode(payload["data"]), dtype="<f2").astype(np.float64).reshape(shape)
    if operation not in OPERATIONS:
        raise ValueError(f"operation must be one of {OPERATIONS}")
    context = {"transform_id": payload["transform_id"], "shape": shape, "nonce": os.urandom(16).hex(),
               "operation": operation, "created_at": unix_seconds(str(payload["created_at"]))}
    return {"transform_id": payload["transform_id"], "params_hash": payload["params_hash"], "shape": shape,
            "epsilon": payload["epsilon"], "nonce": context["nonce"], "created_at": payload["created_at"],
            "envelopes": seal_features(features, party_keys, context)}
