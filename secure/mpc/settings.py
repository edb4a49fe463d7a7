"""Settings of the MPC engine and the dealer (environment variables with the PRIVFACE_MPC_ prefix).

Security guard: CrypTen's "TFP" provider lets party 0 generate (and therefore see) every Beaver triple, which
defeats two-party secret sharing. It is accepted ONLY when ``PRIVFACE_ENV=test``; every other configuration
must use the separate dealer ("TTP"). The check runs when the settings object is built and again inside the
worker process before CrypTen is initialised.
"""
from __future__ import annotations

import ipaddress
import socket
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.settings import is_test_env

DEALER = 2            # the dealer's role number (parties are 0 and 1)
MIN_SECRET_CHARS = 32
# each MPC link's credential: environment variable -> the two roles that hold it
LINK_SECRETS = {"PRIVFACE_MPC_SECRET_P0_DEALER": (0, DEALER), "PRIVFACE_MPC_SECRET_P1_DEALER": (1, DEALER),
                "PRIVFACE_MPC_SECRET_P0_P1": (0, 1)}


def env_for_role(env: dict[str, str], role: int | None) -> dict[str, str]:
    """``env`` without the MPC link credentials that ``role`` (0, 1, DEALER; None: not an MPC process) must not
    hold: a process gets only its own links' credentials."""
    return {k: v for k, v in env.items() if k not in LINK_SECRETS or (role is not None and role in LINK_SECRETS[k])}


def is_loopback(host: str) -> bool:
    """True when ``host`` names only loopback addresses (an unresolvable name counts as not loopback)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos)


def tfp_allowed() -> bool:
    """True only in an explicit test environment (``PRIVFACE_ENV=test``)."""
    return is_test_env()


class MpcSettings(BaseSettings):
    """Where the parties and the dealer rendezvous and how long an MPC operation may take."""

    model_config = SettingsConfigDict(env_prefix="PRIVFACE_MPC_", extra="ignore")

    master_addr: str = Field("127.0.0.1", description="Address of party 0 (it hosts the rendezvous store).")
    master_port: int = Field(29500, ge=1, le=65535, description="Rendezvous (TCPStore) port on party 0.")
    provider: Literal["TTP", "TFP"] = Field(
        "TTP", description='Correlated randomness: "TTP" (separate dealer). "TFP" only with PRIVFACE_ENV=test.')
    op_timeout_s: float = Field(
        10.0, gt=0, description="gloo and party-link timeout: a dead peer makes any MPC operation fail within this "
                                "time. Must exceed the longest single MPC step (raise it for very large galleries).")
    connect_timeout_s: float = Field(30.0, gt=0, description="How long one rendezvous attempt waits for the others.")
    pair_wait_s: float = Field(
        2.0, gt=0, description="How long party 1 waits for the job party 0 announces (capped at op_timeout_s/2).")
    heartbeat_s: float = Field(1.0, gt=0, description="Idle keep-alive period (capped at op_timeout_s/4).")
    retry_backoff_s: float = Field(0.5, ge=0, description="Pause before a new rendezvous attempt.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description='"auto": CUDA when torch sees a GPU, else CPU. All three processes must agree.')
    protocol: Literal["fixed-gallery", "naive"] = Field(
        "fixed-gallery", description='1:N scores: "fixed-gallery" (each gallery row\'s Beaver mask opened once '
                                     'and reused, O(n + d) per query) or "naive" (CrypTen Beaver matmul, O(n d) '
                                     'per query; the baseline). Verify always uses "naive". Both parties must agree.')
    compare: Literal["dealer-bits", "crypten"] = Field(
        "dealer-bits", description='Threshold and max/argmax: "dealer-bits" (7 rounds per knockout level, ~55 bytes '
                                   'per row; secure/mpc/protocols/compare.py) or "crypten" (CrypTen\'s 64-bit circuit; the '
                                   'baseline). Needs the dealer (TTP); TFP always uses "crypten". Both parties agree.')
    shards: int = Field(
        1, ge=1, le=16, description="Gallery shards: K engine pairs (each with its own dealer), shard k on port "
                                    "master_port + k; identify runs the K knockouts in parallel and merges the "
                                    "winners in MPC (secure/mpc/sharding.py). Needs compare=dealer-bits if K > 1.")
    shard_addrs: str = Field(
        "", description="Comma-separated party-0 addresses of shards 0..K-1 (empty: master_addr for all).")
    coalesce_max: int = Field(
        16, ge=1, le=256, description="Up to this many queued single-query identify jobs on the same gallery "
                                      "snapshot (or verify jobs, see coalesce_verify) run as one batched MPC job "
                                      "(concurrent requests share one knockout's rounds); 1 turns coalescing off. "
                                      "Both parties should agree.")
    coalesce_verify: bool = Field(
        True, description="Queued verify jobs coalesce too (each query compared with its own subject's rows only; "
                          "runtime/coalesce.py). Both parties should agree (if not, every job runs alone).")
    torch_threads: int = Field(
        0, ge=0, le=256, description="torch intra-op threads of each MPC worker (0: torch's default, all cores). "
                                     "Set 1 when the dealer and both parties share one small machine.")
    gloo_ifname: str | None = Field(
        None, description="Interface gloo binds (GLOO_SOCKET_IFNAME), e.g. 'lo', or a subnet such as "
                          "'172.30.29.0/24' whose one interface is taken (compose.yaml: the internal mpc network).")
    secret_p0_dealer: str = Field(
        "", repr=False, description="Credential of the party 0 - dealer link (>= 32 characters; party 0 and the "
                                    "dealer only). Authenticates the per-session key agreement (link_keys.py).")
    secret_p1_dealer: str = Field(
        "", repr=False, description="Credential of the party 1 - dealer link (party 1 and the dealer only).")
    secret_p0_p1: str = Field(
        "", repr=False, description="Credential of the party 0 - party 1 link (both parties, never the dealer): "
                                    "authenticates their session key and the direct comparison link.")
    private_network: bool = Field(
        False, description="Required off loopback: the operator states that the network between the parties and "
                           "the dealer is private or an encrypted tunnel (WireGuard, IPsec). gloo cannot encrypt; "
                           "keys never travel on it, but masked values and correlations do.")

    @model_validator(mode="after")
    def _guard_shards(self) -> MpcSettings:
        if self.shards > 1 and (self.compare != "dealer-bits" or self.provider != "TTP"):
            raise ValueError("PRIVFACE_MPC_SHARDS > 1 needs PRIVFACE_MPC_COMPARE=dealer-bits and provider TTP "
                             "(the merge runs on shares of the shard winners)")
        return self

    @model_validator(mode="after")
    def _guard_provider(self) -> MpcSettings:
        if self.provider == "TFP" and not tfp_allowed():
            raise ValueError(
                'PRIVFACE_MPC_PROVIDER="TFP" lets party 0 see every Beaver triple; it is allowed only when '
                'PRIVFACE_ENV=test. Use "TTP" with a separate dealer (privface dealer).')
        return self

    def link_secret(self, me: int, peer: int) -> bytes:
        """The credential of the link between roles ``me`` and ``peer`` (0, 1 or DEALER)."""
        pair = {me, peer}
        if pair == {0, DEALER}:
            value = self.secret_p0_dealer
        elif pair == {1, DEALER}:
            value = self.secret_p1_dealer
        elif pair == {0, 1}:
            value = self.secret_p0_p1
        else:
            raise ValueError(f"no MPC link between {me} and {peer}")
        return value.encode()

    def check_transport(self, me: int) -> None:
        """Refuse to run role ``me`` off loopback without its link credentials and the private-network statement.

        On loopback (one machine: ``make run``, the tests) an unset credential is allowed: the key agreement then
        still hides every key from a passive observer, and no one else is on the path.
        """
        if self.provider != "TTP" or is_loopback(self.master_addr):
            return
        peers = (0, 1) if me == DEALER else (1 - me, DEALER)
        for peer in peers:
            if len(self.link_secret(me, peer)) < MIN_SECRET_CHARS:
                raise RuntimeError(f"refusing to run MPC off loopback ({self.master_addr}) without the {me}-{peer} "
                                   f"link credential (PRIVFACE_MPC_SECRET_*, >= {MIN_SECRET_CHARS} characters)")
        if not self.private_network:
            raise RuntimeError(f"refusing to run MPC off loopback ({self.master_addr}): gloo traffic is not "
                               "encrypted; put it on a private network or tunnel and set "
                               "PRIVFACE_MPC_PRIVATE_NETWORK=true")

    def shard_settings(self) -> list[MpcSettings]:
        """One settings object per shard: its own rendezvous address and port, everything else shared."""
        addrs = [a.strip() for a in self.shard_addrs.split(",") if a.strip()]
        if addrs and len(addrs) != self.shards:
            raise ValueError(f"PRIVFACE_MPC_SHARD_ADDRS names {len(addrs)} addresses for {self.shards} shards")
        if self.master_port + self.shards - 1 > 65535:
            raise ValueError("master_port + shards - 1 exceeds 65535")
        return [self.model_copy(update={"shards": 1, "shard_addrs": "", "master_port": self.master_port + k,
                                        "master_addr": addrs[k] if addrs else self.master_addr})
                for k in range(self.shards)]

    def effective_heartbeat_s(self) -> float:
        return max(0.05, min(self.heartbeat_s, self.op_timeout_s / 4))

    def effective_pair_wait_s(self) -> float:
        return max(0.05, min(self.pair_wait_s, self.op_timeout_s / 2))

    def world_size(self) -> int:
        """Processes in the gloo group: the two parties, plus the dealer with TTP."""
        return 3 if self.provider == "TTP" else 2
