"""The parties' direct link (secure/mpc/runtime/peer_link.py): key check (challenge-response), full-duplex exchange, dead peer."""
from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from secure.mpc.runtime.peer_link import PeerLink, accept_peer, connect_peer

KEY = bytes(range(32))


def _accept_in_thread(server: socket.socket, key: bytes, timeout_s: float = 5) -> dict:
    out: dict = {}

    def run() -> None:
        try:
            out["sock"] = accept_peer(server, key, timeout_s)
        except Exception as exc:  # noqa: BLE001 - reported to the test
            out["error"] = exc

    out["thread"] = threading.Thread(target=run)
    out["thread"].start()
    return out


def test_accept_drops_connections_without_the_key() -> None:
    """An intruder with another key is refused; the party with the session key gets the link."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        acc = _accept_in_thread(server, KEY)
        intruder = socket.create_connection(("127.0.0.1", port), timeout=5)
        with pytest.raises(ConnectionError):
            connect_peer(intruder, b"k" * 32)  # party 0's proof does not verify under the wrong key
        party1 = socket.create_connection(("127.0.0.1", port), timeout=5)
        connect_peer(party1, KEY)
        acc["thread"].join(5)
        accepted = acc["sock"]
        try:
            accepted.sendall(b"hi")
            assert party1.recv(2) == b"hi"
        finally:
            for s in (accepted, party1, intruder):
                s.close()


def test_an_intruder_who_replays_the_nonce_but_lacks_the_key_is_refused() -> None:
    """A connector that answers party 0's challenge without the key is dropped, never accepted."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        acc = _accept_in_thread(server, KEY, timeout_s=1.5)
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"n" * 16)
        s.recv(48)               # party 0's nonce + proof
        s.sendall(b"\0" * 32)    # a forged proof
        assert s.recv(1) == b""  # closed by party 0
        acc["thread"].join(5)
        assert isinstance(acc.get("error"), TimeoutError)  # nobody else came: the link is not handed out
        s.close()


def test_silent_junk_connections_do_not_delay_the_peer() -> None:
    """Ten connections that never speak are served beside the real peer: it gets the link at once."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        acc = _accept_in_thread(server, KEY, timeout_s=5)
        junk = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(10)]
        t0 = time.monotonic()
        party1 = socket.create_connection(("127.0.0.1", port), timeout=5)
        connect_peer(party1, KEY)
        acc["thread"].join(5)
        assert time.monotonic() - t0 < 1.0, "junk connections stalled the link"
        assert "sock" in acc
        for s in [*junk, party1, acc["sock"]]:
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
