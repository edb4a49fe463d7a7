"""Settings constants that more than one process reads: the deployment environment, the development
credentials every process must recognise (to refuse them off loopback), and the party API's batch limit.

Each process's own settings stay in its settings class (app/settings.py, secure/party/settings.py,
secure/mpc/settings.py); only what two of them would otherwise define twice lives here.
"""
from __future__ import annotations

import os

ENV_VAR = "PRIVFACE_ENV"
TEST_ENV = "test"  # the only environment that arms failpoints and accepts CrypTen's TFP provider

# Development credentials of the embedded local stack: one bearer token per gateway -> party link, and the
# shared token of older versions. Every process refuses them off loopback.
DEV_SECRET_KEY = "dev-insecure-change-me"
DEV_INTERNAL_TOKEN = "dev-internal-token"

# identify: most queries in one MPC job; the gateway batches concurrent requests up to it, the parties accept
# as many (the party API's limit, one value for both sides of the link)
MAX_QUERY_BATCH = 64


def deployment_env() -> str:
    """PRIVFACE_ENV as the processes compare it: stripped and lower-case ('production' when unset)."""
    return os.environ.get(ENV_VAR, "production").strip().lower()


def is_test_env() -> bool:
    """True only in an explicit test environment (PRIVFACE_ENV=test)."""
    return deployment_env() == TEST_ENV


def dev_party_token(rank: int) -> str:
    """The development token of the gateway -> party ``rank`` link (distinct per link; loopback only)."""
    return f"dev-party{rank}-token"


DEV_PARTY_TOKENS = (dev_party_token(0), dev_party_token(1))
DEV_TOKENS = frozenset(DEV_PARTY_TOKENS) | {DEV_INTERNAL_TOKEN}
