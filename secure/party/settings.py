"""Settings of one party process (environment variables with the PRIVFACE_PARTY_ prefix).

Credentials are per link. The gateway -> party R link has its own bearer token, ``PRIVFACE_PARTY{R}_TOKEN``
(the same name at the gateway, which holds both, and at party R, which holds only its own);
``PRIVFACE_PARTY_INTERNAL_TOKEN`` overrides it for one process. There is no shared token any more:
``PRIVFACE_INTERNAL_TOKEN`` is ignored. Without either, a loopback party uses its development token
``dev-party{R}-token`` (refused off loopback, see ``deployment.check_deployment``).
"""
from __future__ import annotations

import os
from pathlib import Path

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.paths import PROJECT_ROOT, VAR_DIR
from common.settings import DEV_TOKENS, dev_party_token


class PartySettings(BaseSettings):
    """Configuration of party ``rank`` (0 or 1): its own database, its link's token, TLS, limits."""

    model_config = SettingsConfigDict(env_prefix="PRIVFACE_PARTY_", extra="ignore", populate_by_name=True)

    rank: int = Field(0, ge=0, le=1, description="0 or 1.")
    database_url: str = Field("", description="SQLAlchemy URL; default (empty) sqlite:///<project>/var/party{rank}.db.")
    internal_token: str = Field(
        "", validation_alias=AliasChoices("internal_token", "PRIVFACE_PARTY_INTERNAL_TOKEN"),
        description="Bearer token of the gateway -> this party link; default PRIVFACE_PARTY{rank}_TOKEN.",
    )
    host: str = "127.0.0.1"
    port: int | None = Field(None, description="Default 8101 + rank (matches the gateway's default party_urls).")
    ssl_certfile: str | None = Field(None, description="TLS certificate (PEM): serve HTTPS when set.")
    ssl_keyfile: str | None = None
    ssl_ca_certs: str | None = Field(None, description="CA bundle: when set, clients must present a certificate (mTLS).")
    gateway_cert_sha256: str | None = Field(
        None, description="Pin: SHA-256 (hex, of the DER) of the gateway's client certificate; with mTLS only that "
                          "certificate is served (`privface certs` prints it).")
    match_rate_per_s: float = Field(20.0, gt=0, description="Budget of match jobs per second on the gateway link.")
    match_burst: int = Field(40, ge=1, description="Match jobs allowed at once above the steady rate.")
    match_timeout_s: float = Field(60.0, gt=0, description="Longest MPC job this party waits for.")
    max_request_bytes: int = Field(64 * 1024 * 1024, description="Largest internal request body.")
    metrics_token: str = Field(
        "", description="A read-only scrape credential: a bearer token that may GET /metrics and nothing else "
                        "(403 elsewhere); empty: none (the link token scrapes, as before).")
    sealed_model_dir: Path = Field(PROJECT_ROOT / "inference" / "bundled", description="Sealed mode: the directory "
                                   "of sealed model versions (<version>/sealed.json + layers.npz) this party serves.")
    sealed_replay_window_s: int = Field(
        900, ge=1, description="Sealed mode: a payload's created_at may be at most this old at the party (longer than "
                               "the gateway's PRIVFACE_REPLAY_WINDOW_S, as a job may wait); its nonce is refused "
                               "once used, and remembered in the party database this long plus 5 minutes.")
    log_level: str = "info"
    traffic_log: str | None = Field(None, description="File to append 'METHOD PATH BYTES' per request (no content).")

    @model_validator(mode="after")
    def _defaults(self) -> PartySettings:
        if not self.database_url:
            self.database_url = f"sqlite:///{VAR_DIR / f'party{self.rank}.db'}"
        if self.port is None:
            self.port = 8101 + self.rank
        if not self.internal_token:
            self.internal_token = os.environ.get(f"PRIVFACE_PARTY{self.rank}_TOKEN") or dev_party_token(self.rank)
        if self.metrics_token and (self.metrics_token == self.internal_token or self.metrics_token in DEV_TOKENS):
            raise ValueError("PRIVFACE_PARTY_METRICS_TOKEN must differ from every link token")
        return self

    def resolved_database_url(self) -> str:
        return self.database_url

    def resolved_port(self) -> int:
        return self.port if self.port is not None else 8101 + self.rank

    def has_dev_token(self) -> bool:
        return self.internal_token in DEV_TOKENS
