"""Pydantic v2 request and response schemas of the public REST API (kept apart from the ORM models).

Requests are strict: an unknown field is refused (a typo must not be silently ignored) and numbers are
not coerced from strings. Every timestamp in a response carries its timezone (UTC), also on SQLite,
which hands back naive datetimes.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictFloat, StrictInt
from pydantic.config import JsonDict, JsonValue

from app.auth import METRICS_ALONE, METRICS_SCOPE
from app.services.jobs import JOB_KINDS
from secure.party.api import SealedEnvelope
from inference.transform import default_spec


def _as_utc(value: datetime | None) -> datetime | None:
    """Stored timestamps are UTC; SQLite drops the zone, so a naive one is read as UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


def _iso_string(value: Any) -> Any:
    """created_at must be an ISO 8601 string, not a number that happens to parse as a Unix time."""
    if not isinstance(value, (str, datetime)):
        raise ValueError("must be an ISO 8601 date-time string")
    return value


UtcDatetime = Annotated[datetime, AfterValidator(_as_utc)]
_SPEC = default_spec()
_FEATURES_EXAMPLE: JsonDict = {  # the default transform's real header; `data` must hold the SDK's features
    "transform_id": _SPEC.transform_id,
    "params_hash": _SPEC.params_hash,
    "shape": list[JsonValue](_SPEC.shape),
    "dtype": "float16",
    "data": "<base64 of the 73*14*14 little-endian float16 features the SDK made>",
    "epsilon": _SPEC.epsilon_per_image,
    "nonce": "9f86d081884c7d659a2feaa0c55ad015",
    "created_at": "2026-11-23T10:00:00Z",
}


class FeaturePayload(BaseModel):
    """Noised block-DCT features made on the device by the SDK; the only thing a client uploads."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [_FEATURES_EXAMPLE]})
    transform_id: str = Field(max_length=100)
    params_hash: str = Field(pattern=r"^[0-9a-f]{16}$")
    shape: list[StrictInt] = Field(min_length=3, max_length=3)
    dtype: Literal["float16"]
    data: str = Field(description="base64 of the little-endian float16 array, C order")
    epsilon: StrictFloat | None = Field(gt=0, description="per-image privacy budget the SDK applied; null when "
                                                          "no noise")
    nonce: str = Field(pattern=r"^[0-9a-f]{32,64}$", description="fresh per payload; a replay is refused")
    created_at: Annotated[datetime, BeforeValidator(_iso_string)] = Field(
        description="when the SDK made the payload (ISO 8601, UTC); mandatory: a payload older than the replay "
                    "window, or without a stamp, is refused")


_SEALED_EXAMPLE: JsonDict = {  # the header of gateway mode's example; each envelope holds one party's int64 share
    "transform_id": _SPEC.transform_id,
    "params_hash": _SPEC.params_hash,
    "shape": list[JsonValue](_SPEC.shape),
    "epsilon": _SPEC.epsilon_per_image,
    "nonce": "9f86d081884c7d659a2feaa0c55ad015",
    "created_at": "2026-11-23T10:00:00Z",
    "envelopes": [{"scheme": "x25519-hkdf-sha256-chacha20poly1305-v1", "party": rank, "key_id": "3f1c0a9be2d47785",
                   "epk": "<base64 of the 32-byte ephemeral X25519 key>", "nonce": "<base64 of 12 bytes>",
                   "ciphertext": "<base64 of the ChaCha20-Poly1305 ciphertext of the share>"} for rank in (0, 1)],
}


class SealedPayload(BaseModel):
    """Sealed mode (docs/sealed.md): the SDK's noised features as two additive shares, each encrypted to one party
    (``client/sealed.py``). The gateway can read only this header; ``envelopes[r]`` goes to party r unopened."""

    model_config = ConfigDict(extra="forbid")
    transform_id: str = Field(max_length=100)
    params_hash: str = Field(pattern=r"^[0-9a-f]{16}$")
    shape: list[StrictInt] = Field(min_length=3, max_length=3)
    epsilon: StrictFloat | None = Field(gt=0, description="per-image privacy budget the SDK applied")
    nonce: str = Field(pattern=r"^[0-9a-f]{32}$", description="fresh per payload, bound into both envelopes")
    created_at: Annotated[datetime, BeforeValidator(_iso_string)] = Field(
        description="when the SDK made the payload (ISO 8601, UTC); the replay window applies as in gateway mode")
    envelopes: list[SealedEnvelope] = Field(min_length=2, max_length=2, description="[party 0's, party 1's]")


class SealedEnrollRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"sealed": _SEALED_EXAMPLE}]})
    sealed: SealedPayload


class SealedVerifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "subject_id": "sub_5f0c3b1e9a7d4c2b8e6f1a0d9c8b7a65", "sealed": _SEALED_EXAMPLE}]})
    subject_id: str = Field(max_length=64)
    sealed: SealedPayload


class SealedIdentifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"sealed": _SEALED_EXAMPLE}]})
    sealed: SealedPayload


class ModeIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"mode": "sealed"}]})
    mode: Literal["gateway", "sealed"] = Field(description="'gateway': the gateway embeds the SDK's noised features; "
                                                           "'sealed': the SDK secret-shares them and the parties "
                                                           "embed them under MPC (docs/sealed.md).")


class ModeOut(BaseModel):
    tenant_id: str
    mode: str
    model_version: str
    transform_id: str
    reenroll_needed: int = Field(description="Subjects whose templates are not usable in the new mode: they match "
                                             "again once re-enrolled (the server holds no photo to re-extract from).")


class SubjectCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"external_id": "customer-4711"}]})
    external_id: str | None = Field(None, max_length=200)


class EnrollmentOut(BaseModel):
    id: str
    subject_id: str
    model_version: str
    created_at: UtcDatetime
    epsilon: float | None = None


class SubjectOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "sub_5f0c3b1e9a7d4c2b8e6f1a0d9c8b7a65", "external_id": "customer-4711",
        "created_at": "2026-11-23T10:00:00Z", "enrollments": []}]})
    id: str
    external_id: str | None
    created_at: UtcDatetime
    enrollments: list[EnrollmentOut]


class EnrollRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"features": _FEATURES_EXAMPLE}]})
    features: FeaturePayload


class VerifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "subject_id": "sub_5f0c3b1e9a7d4c2b8e6f1a0d9c8b7a65", "features": _FEATURES_EXAMPLE}]})
    subject_id: str = Field(max_length=64)
    features: FeaturePayload


class VerifyOut(BaseModel):
    """1:1 reveals exactly one bit."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"match": True, "model_version": "v0",
                                                                "request_id": "req_1c2d"}]})
    match: bool
    model_version: str
    request_id: str


class IdentifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"features": _FEATURES_EXAMPLE}]})
    features: FeaturePayload


class IdentifyOut(BaseModel):
    """1:N reveals one bit and, only when it is set, the matched subject."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"match": True, "subject_id": "sub_5f0c3b1e9a7d4c2b8e6f1a0d9c8b7a65", "model_version": "v0",
         "request_id": "req_1c2d"}]})
    match: bool
    subject_id: str | None
    model_version: str
    request_id: str


class PresetIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"preset": "accurate"}]})
    preset: Literal["accurate", "balanced", "strict"] = Field(
        description="Privacy preset (docs/models/presets.md); must match inference.privacy_presets.PRIVACY_PRESETS.")


class PresetOut(BaseModel):
    tenant_id: str
    preset: str
    transform_id: str
    model_version: str
    reenroll_needed: int = Field(description="Subjects enrolled under another transform: they match again once "
                                             "re-enrolled with the new preset's features.")


class TransformOut(BaseModel):
    transform_id: str
    params_hash: str
    model_version: str
    preset: str = Field(description="The tenant's privacy preset this transform serves (docs/models/presets.md).")
    spec: dict[str, Any]
    mode: Literal["gateway", "sealed"] = Field("gateway", description="The tenant's mode: 'sealed' tells the SDK to "
                                               "secret-share its features to the parties' keys (GET /v1/sealed/keys) "
                                               "and use the /v1/sealed/ routes.")


class ModelVersionOut(BaseModel):
    version: str
    status: str
    preset: str = Field(description="The privacy preset this version serves (one active version per preset).")
    sha256: str
    transform_id: str
    params_hash: str
    embedding_dim: int
    threshold: float
    metrics: dict[str, Any]
    created_at: UtcDatetime
    activated_at: UtcDatetime | None


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"kind": "export-model-v0",
                                                                               "params": {}}]})
    # an enum in the schema; an unknown kind still gets the route's clearer "unknown-job-kind" problem
    kind: str = Field(json_schema_extra={"enum": list[JsonValue](sorted(JOB_KINDS))})
    params: dict[str, Any] = Field(default_factory=dict)


class JobOut(BaseModel):
    id: str
    kind: str
    params: dict[str, Any] = Field(default_factory=dict, description="The params it was started with (defaults filled in).")
    status: str
    progress: float
    message: str | None
    result: dict[str, Any] | None
    created_at: UtcDatetime
    updated_at: UtcDatetime


class UnlockOut(BaseModel):
    """The subject's verify lock-out is lifted; `was_locked` says whether it was locked."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"subject_id": "sub_5f0c3b1e9a7d4c2b8e6f1a0d9c8b7a65", "was_locked": True}]})
    subject_id: str
    was_locked: bool


class HealthOut(BaseModel):
    status: str
    checks: dict[str, Any] = Field(default_factory=dict)


# -- tenants, API keys and the audit log (app/routers/admin_tenants.py) ------------------------------------------

Scope = Literal["enroll", "verify", "admin", "metrics"]


class TenantOut(BaseModel):
    id: str
    name: str
    preset: str | None = Field(description="The tenant's privacy preset; null: the gateway's default.")
    key_version: int = Field(description="Template key version; `POST /v1/admin/tenant/rotate-key` bumps it.")
    epsilon_max: float | None
    created_at: UtcDatetime


class TenantCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"id": "globex", "name": "Globex"}]})
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                    description="Letters, digits, `_`, `.`, `-` (it names the parties' galleries).")
    name: str = Field(min_length=1, max_length=200)


class ApiKeyOut(BaseModel):
    prefix: str = Field(description="The key's public part (`pf_<prefix>_...`); the audit log names keys by it.")
    scopes: list[str]
    created_at: UtcDatetime
    revoked_at: UtcDatetime | None


class TenantCreated(BaseModel):
    tenant: TenantOut
    admin_key: str = Field(description="The new tenant's first API key (admin, enroll, verify), shown only now.")


def _metrics_alone(scopes: list[str]) -> list[str]:
    if METRICS_SCOPE in scopes and len(set(scopes)) > 1:
        raise ValueError(METRICS_ALONE)
    return scopes


class ApiKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"scopes": ["enroll", "verify"]},
                                                                              {"scopes": ["metrics"]}]})
    scopes: Annotated[list[Scope], AfterValidator(_metrics_alone)] = Field(
        min_length=1, max_length=3, description="`metrics` (a read-only scrape credential: GET /metrics only) "
                                                "stands alone; the others combine.")


class ApiKeyCreated(BaseModel):
    key: ApiKeyOut
    api_key: str = Field(description="The full key, shown only now: the server keeps a keyed hash of it.")
    replaces: str | None = Field(None, description="On rotation: the prefix of the key it replaces (now revoked).")


class AuditEntryOut(BaseModel):
    id: int
    at: UtcDatetime
    key_prefix: str | None
    action: str
    subject_id: str | None
    outcome: str
    request_id: str | None
