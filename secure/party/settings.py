"""Settings of one party process (environment variables with the PRIVFACE_PARTY_ prefix)."""
from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEV_INTERNAL_TOKEN = "dev-internal-token"


class PartySettings(BaseSettings):
    """Configuration of party ``rank`` (0 or 1): its own database, the internal token, where it listens."""

    model_config = SettingsConfigDict(env_prefix="PRIVFACE_PARTY_", extra="ignore", populate_by_name=True)

    rank: int = Field(0, ge=0, le=1, description="0 or 1.")
    database_url: str = Field("", description="SQLAlchemy URL; default (empty) sqlite:///<project>/var/party{rank}.db.")
    internal_token: str = Field(
        DEV_INTERNAL_TOKEN,
        validation_alias=AliasChoices("internal_token", "PRIVFACE_PARTY_INTERNAL_TOKEN", "PRIVFACE_INTERNAL_TOKEN"),
        description="Bearer token shared by the gateway and the parties.",
    )
    host: str = "127.0.0.1"
    port: int | None = Field(None, description="Default 8101 + rank (matches the gateway's default party_urls).")
    ssl_certfile: str | None = Field(None, description="TLS certificate (PEM): serve HTTPS when set.")
    ssl_keyfile: str | None = None
    ssl_ca_certs: str | None = Field(None, description="CA bundle: when set, clients must present a certificate (mTLS).")
    match_timeout_s: float = Field(60.0, gt=0, description="Longest MPC job this party waits for.")
    max_request_bytes: int = Field(64 * 1024 * 1024, description="Largest internal request body.")
    log_level: str = "info"
    traffic_log: str | None = Field(None, description="File to append 'METHOD PATH BYTES' per request (no content).")

    @model_validator(mode="after")
    def _defaults(self) -> PartySettings:
        if not self.database_url:
            self.database_url = f"sqlite:///{PROJECT_ROOT / 'var' / f'party{self.rank}.db'}"
        if self.port is None:
            self.port = 8101 + self.rank
        return self

    def resolved_database_url(self) -> str:
        return self.database_url

    def resolved_port(self) -> int:
        return self.port if self.port is not None else 8101 + self.rank
