"""Session keys of the MPC links, agreed over gloo without any key travelling on it.

Why: gloo cannot encrypt, and the previous set-up sent the dealer's PRG seeds and the comparison keys over it in
the clear, so anyone on the path read them. Now each link (party 0 - dealer, party 1 - dealer, party 0 - party 1)
runs one ephemeral X25519 exchange per MPC session:

    initiator -> responder : X_i                         (32 bytes)
    responder -> initiator : X_r, HMAC(s, "r" | X_i | X_r | label)
    initiator -> responder : HMAC(s, "i" | X_i | X_r | label)
    key = HKDF-SHA256(DH(x_i, X_r), salt = s, info = label | X_i | X_r)   (32 bytes)

``s`` is the link's credential (``PRIVFACE_MPC_SECRET_*``, one per link, never sent). An eavesdropper learns
nothing about the key (DH), and a process without the credential cannot complete the exchange as either end:
each side checks the other's MAC before any key is used, and refuses the session otherwise. Ephemeral keys give
forward secrecy: a credential stolen later does not open earlier sessions. Without a credential (loopback
development only; ``settings.require_link_secrets``) the exchange still hides the key from a passive observer.
"""
from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

Sender = Callable[[bytes], None]    # sends bytes to the peer
Receiver = Callable[[int], bytes]   # receives exactly n bytes from the peer
KEY_BYTES = 32
_PUB = 32
_MAC = 32


class LinkAuthError(RuntimeError):
    """The peer did not prove the link credential: the session is refused."""


def _mac(secret: bytes, role: bytes, x_i: bytes, x_r: bytes, label: str) -> bytes:
    return hmac.new(secret or b"\0", role + x_i + x_r + label.encode(), hashlib.sha256).digest()


def _public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _derive(shared: bytes, secret: bytes, x_i: bytes, x_r: bytes, label: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=secret or None,
                info=label.encode() + x_i + x_r).derive(shared)


def initiate(send: Sender, recv: Receiver, secret: bytes, label: str) -> bytes:
    """The initiator's side; ``send(bytes)`` / ``recv(n) -> bytes`` carry the messages to and from the peer."""
    mine = X25519PrivateKey.generate()
    x_i = _public(mine)
    send(x_i)
    answer = recv(_PUB + _MAC)
    x_r, tag = answer[:_PUB], answer[_PUB:]
    if not hmac.compare_digest(tag, _mac(secret, b"r", x_i, x_r, label)):
        raise LinkAuthError(f"MPC link {label}: the peer does not hold this link's credential")
    send(_mac(secret, b"i", x_i, x_r, label))
    return _derive(mine.exchange(X25519PublicKey.from_public_bytes(x_r)), secret, x_i, x_r, label)


def respond(send: Sender, recv: Receiver, secret: bytes, label: str) -> bytes:
    """The responder's side of ``initiate``."""
    x_i = recv(_PUB)
    mine = X25519PrivateKey.generate()
    x_r = _public(mine)
    send(x_r + _mac(secret, b"r", x_i, x_r, label))
    if not hmac.compare_digest(recv(_MAC), _mac(secret, b"i", x_i, x_r, label)):
        raise LinkAuthError(f"MPC link {label}: the peer does not hold this link's credential")
    return _derive(mine.exchange(X25519PublicKey.from_public_bytes(x_i)), secret, x_i, x_r, label)


def gloo_channel(peer: int) -> tuple[Sender, Receiver]:
    """send/recv of raw bytes to one peer rank over the default gloo group (point to point, blocking)."""
    import torch
    import torch.distributed as dist

    def send(data: bytes) -> None:
        dist.send(torch.frombuffer(bytearray(data), dtype=torch.uint8), dst=peer)

    def recv(n: int) -> bytes:
        buf = torch.empty(n, dtype=torch.uint8)
        dist.recv(buf, src=peer)
        return bytes(buf.numpy())

    return send, recv


def agree_over_gloo(me: int, peer: int, secret: bytes, label: str) -> bytes:
    """One session key with ``peer``; the lower rank initiates (both sides call this)."""
    send, recv = gloo_channel(peer)
    return initiate(send, recv, secret, label) if me < peer else respond(send, recv, secret, label)
