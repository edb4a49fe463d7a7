"""Gateway ORM models: metadata only. No template, share, embedding or score is ever stored here."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (JSON, BigInteger, Boolean, ColumnElement, DateTime, Float, ForeignKey, Index, Integer, String,
                        Text, or_)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.db import Base

# SQLite only auto-increments an INTEGER primary key; PostgreSQL gets a real BIGINT.
Seq = BigInteger().with_variant(Integer, "sqlite")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Tenant(Base):
    """An integrator. Its template key is derived from the master secret and `key_version`."""

    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    key_version: Mapped[int] = mapped_column(Integer, default=1)
    epsilon_max: Mapped[float | None] = mapped_column(Float, nullable=True)
    # privacy preset (inference.privacy_presets); None = the gateway's default_preset setting
    preset: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # 'gateway' (the gateway embeds the SDK's features) or 'sealed' (the parties do, under MPC: docs/sealed.md)
    mode: Mapped[str] = mapped_column(String(16), default="gateway", server_default="gateway")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiKey(Base):
    """An API key: only a keyed hash of its secret part is stored."""

    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    prefix: Mapped[str] = mapped_column(String(32), unique=True, index=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    scopes: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    tenant: Mapped[Tenant] = relationship()


class Subject(Base):
    """A person enrolled by a tenant. Deleted subjects keep no enrollments."""

    __tablename__ = "subjects"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    external_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    enrollments: Mapped[list[Enrollment]] = relationship(back_populates="subject", order_by="Enrollment.template_seq")


class Enrollment(Base):
    """One protected template held as two shares at the parties, named by its operation seq."""

    __tablename__ = "enrollments"
    template_seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    subject_id: Mapped[str] = mapped_column(ForeignKey("subjects.id"), index=True)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True)
    model_version: Mapped[str] = mapped_column(String(64), index=True)
    key_version: Mapped[int] = mapped_column(Integer)
    transform_id: Mapped[str] = mapped_column(String(100))
    epsilon: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    subject: Mapped[Subject] = relationship(back_populates="enrollments")

    # which model versions hold a tenant's current templates: one lookup per version (biometrics.versions_in_use)
    __table_args__ = (Index("ix_enrollments_tenant_key_model", "tenant_id", "key_version", "model_version"),)


class Operation(Base):
    """The ordered log the two parties apply; the gateway's durable record of each 2PC decision."""

    __tablename__ = "operations"
    seq: Mapped[int] = mapped_column(Seq, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))  # store | delete
    template_seqs: Mapped[list[int]] = mapped_column(JSON, default=list)
    # the parties' gallery name ({version}/{tenant}/k{n}, app/services/templates.gallery_name), not a model version
    model_version: Mapped[str | None] = mapped_column(String(200), nullable=True)
    state: Mapped[str] = mapped_column(String(16), default="preparing", index=True)  # preparing|committed|aborted
    acked_0: Mapped[bool] = mapped_column(Boolean, default=False)
    acked_1: Mapped[bool] = mapped_column(Boolean, default=False)
    context: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # what to record when committed (subject, tenant...)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


def unacknowledged() -> ColumnElement[bool]:
    """Operations a party has not acknowledged: few at any time, found through a partial index of just them
    (each snapshot looks for them; scanning the whole log cost 26 ms per verify at 100,000 operations)."""
    return or_(Operation.acked_0.is_(False), Operation.acked_1.is_(False))


Index("ix_operations_unacknowledged", Operation.seq, sqlite_where=unacknowledged(), postgresql_where=unacknowledged())


class OperationTotals(Base):
    """How many operations are committed, kept in the transaction that commits each one (``operations.decide``).

    A snapshot's committed count (what each party must report) is this total minus the few committed after the
    snapshot: counting the whole log instead read every operation on every verify (12 ms at 100,000 on SQLite).
    One row, id 1, created by migration 0005 with the count of the rows already committed."""

    __tablename__ = "operation_totals"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    committed: Mapped[int] = mapped_column(BigInteger, default=0)


class ModelVersion(Base):
    """A registered ONNX model: checksum, transform, metrics and lifecycle status."""

    __tablename__ = "model_versions"
    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    path: Mapped[str] = mapped_column(Text)  # relative to the model directory setting
    sha256: Mapped[str] = mapped_column(String(64))
    transform_id: Mapped[str] = mapped_column(String(100))
    params_hash: Mapped[str] = mapped_column(String(32))
    embedding_dim: Mapped[int] = mapped_column(Integer)
    threshold: Mapped[float] = mapped_column(Float)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default="candidate", index=True)  # candidate|active|retired
    # the privacy preset it serves (from its transform); one active version per preset
    preset: Mapped[str] = mapped_column(String(32), default="accurate", index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    activated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Job(Base):
    """A background job (run by an rq worker, or in-process without Redis) and its progress."""

    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(64))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default="queued")  # queued|running|succeeded|failed
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str | None] = mapped_column(Text, nullable=True)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class Nonce(Base):
    """Replay protection without Redis: nonces seen within the replay window."""

    __tablename__ = "nonces"
    nonce: Mapped[str] = mapped_column(String(64), primary_key=True)
    seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)


class AuditEntry(Base):
    """Who did what, when, with which outcome (never features, embeddings or scores)."""

    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    tenant_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    key_prefix: Mapped[str | None] = mapped_column(String(32), nullable=True)
    action: Mapped[str] = mapped_column(String(64))
    subject_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    outcome: Mapped[str] = mapped_column(String(32))
    request_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
