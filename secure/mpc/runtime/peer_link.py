"""A direct TCP link between the two parties for the comparison protocol's many small exchanges.

Why: the dealer-bits comparison (``compare.py``) swaps arrays 7 times per knockout level, most of them small
bit-sliced ones. Through gloo's point-to-point ops a small swap costs ~0.5 ms on loopback (0.3 ms of it CPU), through
a plain non-blocking socket with TCP_NODELAY ~0.025 ms; a 100k-row query makes ~130 swaps. Large swaps are
no slower than gloo's either (24 MB: 12.5 vs 15 ms here).

Set-up, once per MPC session, piggybacking on the gloo group the parties already share: party 0 listens on an
ephemeral port (gloo itself needs such ports between the parties) and sends the port to party 1 over gloo;
party 1 connects to party 0's rendezvous address. Both ends then prove the parties' session key (agreed with the
party link's credential, ``link_keys.py``) by a challenge-response (``_handshake``): nothing secret travels, a
stranger cannot take the link, and junk connections are served side by side with the real one, so they cannot
stall it. The link carries the same masked values as gloo (``docs/security.md``); it is not encrypted.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import select
import socket
import time

import numpy as np

NONCE_BYTES = 16
MAC_BYTES = 32
_CHUNK = 1 << 18          # bytes per send() call of the interleaved loop


class PeerLink:
    """One party's end of the link: ``exchange`` sends this party's bytes while receiving as many of the peer's."""

    def __init__(self, sock: socket.socket, timeout_s: float) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        self.sock, self.timeout_s = sock, float(timeout_s)

    def exchange(self, mine: np.ndarray) -> np.ndarray:
        """Both parties call this with equal-sized arrays; returns the peer's (same dtype and shape)."""
        out = np.ascontiguousarray(mine)
        theirs = np.empty_like(out)
        self._swap(out.data.cast("B"), theirs.data.cast("B"))
        return theirs

    def _swap(self, out: memoryview, into: memoryview) -> None:
        """Send ``out`` and fill ``into`` at the same time (neither side can block the other's buffer)."""
        sent = got = 0
        deadline = time.monotonic() + self.timeout_s
        while sent < len(out) or got < len(into):
            if sent < len(out):
                try:
                    sent += self.sock.send(out[sent:sent + _CHUNK])
                except BlockingIOError:
                    pass
            if got < len(into):
                try:
                    n = self.sock.recv_into(into[got:])
                except BlockingIOError:
                    n = -1
                if n == 0:
                    raise ConnectionError("MPC peer closed the link")
                got += max(n, 0)
            if sent < len(out) or got < len(into):
                self._wait(deadline, want_write=sent < len(out), want_read=got < len(into))

    def _wait(self, deadline: float, want_write: bool, want_read: bool) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("MPC peer link timed out")
        readable, writable, _ = select.select([self.sock] if want_read else [], [self.sock] if want_write else [],
                                              [], left)
        if not readable and not writable:
            raise TimeoutError("MPC peer link timed out")

    def close(self) -> None:
        self.sock.close()


def open_link(rank: int, peer_addr: str, connect_timeout_s: float, op_timeout_s: float, key: bytes) -> PeerLink:
    """Both parties call this right after the gloo group is up (rank 0 listens, rank 1 connects to
    ``peer_addr``, party 0's rendezvous address). ``key``: the parties' session key. ``op_timeout_s`` bounds every
    later exchange."""
    import torch
    import torch.distributed as dist

    if rank == 0:
        dual = socket.has_dualstack_ipv6()  # then party 1 may reach us over IPv4 or IPv6
        with socket.create_server(("", 0), family=socket.AF_INET6 if dual else socket.AF_INET,
                                  dualstack_ipv6=dual) as server:
            port = server.getsockname()[1]
            dist.send(torch.tensor(list(port.to_bytes(2, "big")), dtype=torch.uint8), dst=1)
            sock = accept_peer(server, key, connect_timeout_s)
        return PeerLink(sock, op_timeout_s)
    msg = torch.empty(2, dtype=torch.uint8)
    dist.recv(msg, src=0)
    sock = socket.create_connection((peer_addr, int.from_bytes(bytes(msg.tolist()), "big")),
                                    timeout=connect_timeout_s)
    connect_peer(sock, key)
    return PeerLink(sock, op_timeout_s)


def _mac(key: bytes, role: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.new(key, b"privface/peer-link/" + role + first + second, hashlib.sha256).digest()


def connect_peer(sock: socket.socket, key: bytes) -> None:
    """Party 1's side: send a nonce, check party 0's proof over it, prove the key over party 0's nonce."""
    mine = os.urandom(NONCE_BYTES)
    sock.sendall(mine)
    answer = _recv_exact(sock, NONCE_BYTES + MAC_BYTES)
    theirs, tag = answer[:NONCE_BYTES], answer[NONCE_BYTES:]
    if not hmac.compare_digest(tag, _mac(key, b"p0", mine, theirs)):
        sock.close()
        raise ConnectionError("MPC peer link: the listener does not hold the parties' session key")
    sock.sendall(_mac(key, b"p1", theirs, mine))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        if not chunk:
            raise ConnectionError("MPC peer link closed during the handshake")
        got += chunk
    return got


class _Pending:
    """One accepted connection going through party 0's side of the handshake (non-blocking)."""

    def __init__(self, sock: socket.socket, key: bytes) -> None:
        sock.setblocking(False)
        self.sock, self.key, self.buf = sock, key, b""
        self.nonce = os.urandom(NONCE_BYTES)
        self.stage = "nonce"  # waiting for the connector's nonce, then for its proof

    def step(self) -> bool | None:
        """Read what has arrived: True = authenticated, False = refused, None = not yet."""
        try:
            chunk = self.sock.recv(NONCE_BYTES + MAC_BYTES)
        except BlockingIOError:
            return None
        except OSError:
            return False
        if not chunk:
            return False
        self.buf += chunk
        if self.stage == "nonce" and len(self.buf) >= NONCE_BYTES:
            self.theirs, self.buf = self.buf[:NONCE_BYTES], self.buf[NONCE_BYTES:]
            try:
                self.sock.sendall(self.nonce + _mac(self.key, b"p0", self.theirs, self.nonce))
            except OSError:
                return False
            self.stage = "proof"
        if self.stage == "proof" and len(self.buf) >= MAC_BYTES:
            return hmac.compare_digest(self.buf[:MAC_BYTES], _mac(self.key, b"p1", self.nonce, self.theirs))
        return None


def accept_peer(server: socket.socket, key: bytes, timeout_s: float) -> socket.socket:
    """The first connection that proves ``key``; every other connection is dropped, and all are served at once (a
    silent or slow intruder cannot delay the real peer)."""
    deadline = time.monotonic() + timeout_s
    server.setblocking(False)
    pending: dict[socket.socket, _Pending] = {}
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("MPC peer did not open the link")
            readable, _, _ = select.select([server, *pending], [], [], left)
            for s in readable:
                if s is server:
                    try:
                        conn, _ = server.accept()
                    except BlockingIOError:
                        continue
                    pending[conn] = _Pending(conn, key)
                    continue
                verdict = pending[s].step()
                if verdict is True:
                    del pending[s]
                    s.setblocking(True)
                    return s
                if verdict is False:
                    del pending[s]
                    s.close()
    finally:
        for s in pending:
            s.close()
