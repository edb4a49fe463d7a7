"""The party database: this party's shares and its two-phase operation log (separate from the gateway's).

Nothing here is a template: ``shares.share`` is one additive share (uniform over Z_2^64, int64 LE bytes).
A committed delete erases the share bytes (``share`` becomes NULL) and keeps the row as a tombstone.
Every ``gallery`` attribute is stored in a column named ``model_version``: the name the first releases gave it
(the migrations and existing databases keep it; only the Python name says what it holds).
"""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import JSON, BigInteger, DateTime, Float, Integer, LargeBinary, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

OP_KINDS = ("store", "delete", "none")  # 'none': a tombstone for a seq aborted before this party heard of it
OP_STATES = ("prepared", "committed", "aborted")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class PartyBase(DeclarativeBase):
    """Declarative base of the party database (never shared with the gateway's models)."""


class ShareRow(PartyBase):
    __tablename__ = "shares"
    template_seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    gallery: Mapped[str] = mapped_column("model_version", String(200), index=True)
    dim: Mapped[int] = mapped_column(Integer)
    share: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # int64 LE; NULL once deleted
    add_seq: Mapped[int] = mapped_column(BigInteger, unique=True, index=True)
    del_seq: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class OpRow(PartyBase):
    __tablename__ = "ops"
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(16))  # store | delete | none
    template_seq: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # store
    template_seqs: Mapped[list[int] | None] = mapped_column(JSON, nullable=True)  # delete
    gallery: Mapped[str | None] = mapped_column("model_version", String(200), nullable=True)
    state: Mapped[str] = mapped_column(String(16), index=True)  # prepared | committed | aborted
    payload: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # the share of a prepared store
    digest: Mapped[str] = mapped_column(String(64))  # sha256 of the op's content (idempotent re-prepare)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    decided_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class GalleryRow(PartyBase):
    """A gallery's fixed match threshold, recorded once when the gateway registers the gallery (immutable)."""

    __tablename__ = "galleries"
    gallery: Mapped[str] = mapped_column("model_version", String(200), primary_key=True)
    threshold: Mapped[float] = mapped_column(Float(precision=53))
    identify_thresholds: Mapped[list[list[float]] | None] = mapped_column(JSON, nullable=True)  # [[max_n, threshold], ...]
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class MatchAuditRow(PartyBase):
    """One match job as this party saw it: what, on which gallery, how many rows — never a share or a result."""

    __tablename__ = "match_audit"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    job_id: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16))
    gallery: Mapped[str] = mapped_column("model_version", String(200))
    rows: Mapped[int] = mapped_column(Integer)
    queries: Mapped[int] = mapped_column(Integer)
    status: Mapped[int] = mapped_column(Integer)  # the HTTP status this party answered


class SealedNonceRow(PartyBase):
    """A sealed request nonce this party has used for an MPC job (secure/party/nonces.py): a replayed envelope is
    refused. Rows older than the freshness window are purged (an envelope that old is refused as stale anyway)."""

    __tablename__ = "sealed_nonces"
    nonce: Mapped[str] = mapped_column(String(32), primary_key=True)
    operation: Mapped[str] = mapped_column(String(16))
    seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
