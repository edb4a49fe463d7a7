"""The test stacks' ports: never from the ephemeral range that outbound connections draw from, never twice."""
from __future__ import annotations

import socket

import pytest

from devtools.net import LOWEST, ephemeral_start, free_port, is_free


@pytest.mark.skipif(ephemeral_start() - LOWEST < 1_000, reason="this host's ephemeral range leaves no room below it")
def test_ports_are_below_the_ephemeral_range_distinct_and_bindable() -> None:
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(LOWEST <= port < ephemeral_start() for port in ports)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports[-1]))


def test_a_port_in_use_is_not_free() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        assert not is_free(int(sock.getsockname()[1]))
