"""The parties' direct link (secure/mpc/peer_link.py): token check, full-duplex exchange, dead peer."""
from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from secure.mpc.peer_link import TOKEN_BYTES, PeerLink, _accept_with_token


def _connect(port: int, token: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(token)
    return s


def test_accept_drops_connections_without_the_token() -> None:
    token = bytes(range(TOKEN_BYTES))
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        intruder = _connect(port, b"x" * TOKEN_BYTES)
        party1 = _connect(port, token)
        accepted = _accept_with_token(server, token, timeout_s=5)
        try:
            accepted.sendall(b"hi")
            assert party1.recv(2) == b"hi"
            assert intruder.recv(1) == b""  # closed by party 0
        finally:
            for s in (accepted, party1, intruder):
                s.close()


def _pair(timeout_s: float = 5) -> tuple[PeerLink, PeerLink]:
    """Two ends of a real loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        b = socket.create_connection(server.getsockname()[:2], timeout=5)
        a, _ = server.accept()
    return PeerLink(a, timeout_s), PeerLink(b, timeout_s)


def test_exchange_is_full_duplex_for_large_arrays() -> None:
    """Both sides send 24 MB at once: neither blocks on a full socket buffer."""
    left, right = _pair()
    x = np.arange(3_000_000, dtype=np.uint64)
    y = x[::-1].copy()
    got = {}
    t = threading.Thread(target=lambda: got.setdefault("right", right.exchange(y)))
    t.start()
    got["left"] = left.exchange(x)
    t.join(10)
    assert np.array_equal(got["left"], y) and np.array_equal(got["right"], x)


def test_a_dead_or_silent_peer_fails_the_exchange() -> None:
    left, right = _pair(timeout_s=0.3)
    with pytest.raises(TimeoutError):
        left.exchange(np.zeros(4, dtype=np.uint64))  # the peer never answers
    right.close()
    with pytest.raises((ConnectionError, OSError)):
        left.exchange(np.zeros(4, dtype=np.uint64))
