"""Which network interface gloo binds: a name as given, or the interface whose IPv4 address lies in a subnet.

Why a subnet: in a container on two networks (the parties in compose.yaml: the gateway's network and the
internal `mpc` one) the interface names depend on the order the engine attached the networks, which compose
does not fix, and gloo left alone binds the address the hostname resolves to (the gateway's network, which the
dealer cannot reach). A subnet names the MPC network independently of that order (tests/test_compose_stack.py).
"""
from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct

SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address


def ipv4_of(ifname: str) -> ipaddress.IPv4Address | None:
    """The interface's IPv4 address, or None when it has none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            packed = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, struct.pack("256s", ifname.encode()[:15]))
        except OSError:
            return None
    return ipaddress.IPv4Address(packed[20:24])


def gloo_interface(setting: str) -> str:
    """`setting` itself when it names an interface; for a subnet (CIDR), the one interface inside it."""
    if "/" not in setting:
        return setting
    subnet = ipaddress.ip_network(setting, strict=False)
    found = [name for _, name in socket.if_nameindex() if (ip := ipv4_of(name)) is not None and ip in subnet]
    if len(found) != 1:
        raise RuntimeError(f"PRIVFACE_MPC_GLOO_IFNAME={setting}: expected one interface in that subnet, found "
                           f"{found or 'none'}")
    return found[0]
