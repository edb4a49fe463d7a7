"""A direct TCP link between the two parties for the comparison protocol's many small exchanges.

Why: the dealer-bits comparison (``compare.py``) swaps arrays 7 times per knockout level, most of them small
bit-sliced ones. Through gloo's point-to-point ops a small swap costs ~0.5 ms on loopback (0.3 ms of it CPU), through
a plain non-blocking socket with TCP_NODELAY ~0.025 ms; a 100k-row query makes ~130 swaps. Large swaps are
no slower than gloo's either (24 MB: 12.5 vs 15 ms here).

Set-up, once per MPC session, piggybacking on the gloo group the parties already share: party 0 listens on an
ephemeral port (gloo itself needs such ports between the parties) and sends the port and a fresh 16-byte token
to party 1 over gloo; party 1 connects to party 0's rendezvous address and presents the token; party 0 accepts
only a connection that presents it. Nothing secret travels on the link that would not travel on gloo: both carry
the same masked values (``docs/security.md``).
"""
from __future__ import annotations

import os
import select
import socket
import time

import numpy as np

TOKEN_BYTES = 16
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
        self._swap(memoryview(out).cast("B"), memoryview(theirs).cast("B"))
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


def open_link(rank: int, peer_addr: str, connect_timeout_s: float, op_timeout_s: float) -> PeerLink:
    """Both parties call this right after the gloo group is up (rank 0 listens, rank 1 connects to
    ``peer_addr``, party 0's rendezvous address). ``op_timeout_s`` bounds every later exchange."""
    import torch
    import torch.distributed as dist

    if rank == 0:
        token = os.urandom(TOKEN_BYTES)
        dual = socket.has_dualstack_ipv6()  # then party 1 may reach us over IPv4 or IPv6
        with socket.create_server(("", 0), family=socket.AF_INET6 if dual else socket.AF_INET,
                                  dualstack_ipv6=dual) as server:
            port = server.getsockname()[1]
            dist.send(torch.tensor(list(port.to_bytes(2, "big") + token), dtype=torch.uint8), dst=1)
            sock = _accept_with_token(server, token, connect_timeout_s)
        return PeerLink(sock, op_timeout_s)
    msg = torch.empty(2 + TOKEN_BYTES, dtype=torch.uint8)
    dist.recv(msg, src=0)
    raw = bytes(msg.tolist())
    sock = socket.create_connection((peer_addr, int.from_bytes(raw[:2], "big")), timeout=connect_timeout_s)
    sock.sendall(raw[2:])
    return PeerLink(sock, op_timeout_s)


def _accept_with_token(server: socket.socket, token: bytes, timeout_s: float) -> socket.socket:
    """The first connection that presents ``token``; others are dropped."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("MPC peer did not open the link")
        server.settimeout(left)
        sock, _ = server.accept()
        sock.settimeout(max(0.1, min(left, 5.0)))
        try:
            got = b""
            while len(got) < TOKEN_BYTES:
                chunk = sock.recv(TOKEN_BYTES - len(got))
                if not chunk:
                    break
                got += chunk
        except OSError:
            got = b""
        if got == token:
            return sock
        sock.close()
