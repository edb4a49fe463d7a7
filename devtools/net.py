"""Free loopback ports for the processes a test starts.

A port the OS hands out with bind(0) comes from the ephemeral range, the same range every outbound connection
(Redis, PostgreSQL, httpx) draws its source port from: between picking the port and the child process binding
it, another connection could take it ("address already in use", seen once in CI). So ports are drawn from below
the ephemeral range, where the OS never assigns source ports, checked free, and never handed out twice by one
process (pytest-xdist workers are separate processes: a collision between them stays possible, if rare).
"""
from __future__ import annotations

import secrets
import socket
from pathlib import Path

LOWEST = 10_000
_given: set[int] = set()


def ephemeral_start() -> int:
    """The first port of the OS's ephemeral range (Linux's default when /proc does not say)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def is_free(port: int) -> bool:
    """Whether 127.0.0.1:port can be bound right now."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, outside the ephemeral range, not given before by this process."""
    top = ephemeral_start()
    for _ in range(1_000):
        if top - LOWEST < 1_000:  # an unusual range leaves no room below it: the OS's choice (ephemeral, racy)
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = int(sock.getsockname()[1])
        else:
            port = LOWEST + secrets.randbelow(top - LOWEST)
        if port not in _given and is_free(port):
            _given.add(port)
            return port
    raise RuntimeError(f"no free port found in {LOWEST}..{top - 1}")
