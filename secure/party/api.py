"""The party's wire contract: every request and response body of ``/internal/*``, defined once.

The party server (``server.py``) validates requests with these models and answers with them; the gateway's
client (``secure/coordinator.py``) builds its requests from the same models and reads the answers with them, so
the two sides cannot drift apart. Shares and queries travel as base64 of int64 little-endian (``sharing.to_b64``)
and are left out of every repr.

A gallery is named by the gateway (``{model version}/{tenant}/k{key version}``; any string up to
``GALLERY_NAME_MAX`` characters). Its field is ``gallery``; requests written before the rename called it
``model_version``, and the party still accepts that spelling, so a gateway and a party of different releases keep
working during an upgrade.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from common.settings import MAX_QUERY_BATCH as MAX_QUERY_BATCH  # identify: most queries in one job (shared layer)

JOB_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
MAX_TEMPLATES = 10_000  # most templates one delete or one verify names
GALLERY_NAME_MAX = 200
OUTPUT_MODULUS = 1 << 64  # output shares are residues mod 2^64, written as decimal strings
# How long a party keeps an idle keep-alive connection open (uvicorn's timeout_keep_alive). The gateway's pool
# forgets an idle connection after a quarter of it (``partylink.POOL_IDLE_S``), so it never sends on one the
# party is closing: with both at 5 s (the two libraries' defaults) a reused connection raced the party's close.
KEEP_ALIVE_S = 20  # seconds (uvicorn takes an int)

MatchKind = Literal["verify", "identify"]
OpState = Literal["prepared", "committed", "aborted"]


def _gallery(required: bool) -> Any:
    """The ``gallery`` field; the former name ``model_version`` is still read (see the module docstring)."""
    return Field(... if required else None, min_length=1 if required else None, max_length=GALLERY_NAME_MAX,
                 validation_alias=AliasChoices("gallery", "model_version"))


class PrepareIn(BaseModel):
    """``POST /internal/ops/prepare``: the first phase of a store or a delete."""

    seq: int = Field(..., gt=0)
    kind: Literal["store", "delete"]
    gallery: str | None = _gallery(required=False)
    template_seq: int | None = Field(None, gt=0)
    template_seqs: list[int] = Field(default_factory=list, max_length=MAX_TEMPLATES)
    share: str | None = Field(None, description="store: base64 of this party's int64 LE share", repr=False)


class OpOut(BaseModel):
    """The state of one operation at this party (None: never heard of it)."""

    seq: int
    state: OpState | None


class GalleryIn(BaseModel):
    """``POST /internal/galleries``: record a gallery's thresholds, once."""

    gallery: str = _gallery(required=True)
    threshold: float = Field(..., description="verify (1:1) threshold")
    identify_thresholds: list[tuple[int, float]] | None = Field(
        None, max_length=32, description="identify schedule [[max gallery size, threshold], ...] "
                                         "(secure/thresholds.py); absent: identify uses the verify threshold")


class GalleryOut(BaseModel):
    gallery: str
    threshold: float
    identify_thresholds: list[tuple[int, float]] | None = None


class CheckIn(BaseModel):
    """``POST /internal/match/check``: would a match job on this snapshot run here, and on which rows?"""

    kind: MatchKind
    gallery: str = _gallery(required=True)
    upto_seq: int = Field(..., ge=0)
    expected_committed: int | None = Field(None, ge=0)
    template_seqs: list[int] | None = Field(None, max_length=MAX_TEMPLATES)


class CheckOut(BaseModel):
    n: int  # rows in the job's gallery
    labels_digest: str  # sha256 of the gallery's labels (public), so the gateway can check both parties agree


class SealedEnvelope(BaseModel):
    """One party's share of the SDK's features, encrypted to that party (``client/sealed.py``); the gateway relays it
    unopened."""

    model_config = ConfigDict(extra="forbid")
    scheme: str = Field(..., max_length=64)
    party: int = Field(..., ge=0, le=1)
    key_id: str = Field(..., pattern=r"^[0-9a-f]{16}$")
    epk: str = Field(..., max_length=64, repr=False)
    nonce: str = Field(..., max_length=32, repr=False)
    ciphertext: str = Field(..., max_length=2_000_000, repr=False)


class SealedIn(BaseModel):
    """Sealed mode (issue 12): what one party needs to compute its share of a protected query under MPC."""

    model: str = Field(..., pattern=r"^sealed-v[0-9]{1,9}$", description="the sealed model version (a folder name)")
    transform_id: str = Field(..., max_length=100)
    shape: list[int] = Field(..., min_length=3, max_length=3)
    nonce: str = Field(..., pattern=r"^[0-9a-f]{32}$", description="the request's nonce (bound into the envelope)")
    operation: Literal["enroll", "verify", "identify"] = Field(..., description="bound into the envelope")
    created_at: int = Field(..., ge=0, description="the payload's created_at, Unix seconds (bound into the envelope)")
    envelope: SealedEnvelope
    rotation: str = Field(..., repr=False, description="base64 of float64 LE [d, d]: the tenant's protection matrix")


class SealedCheckOut(BaseModel):
    """``POST /internal/sealed/check`` (body: ``SealedIn``): this party can use its sealed input."""

    ok: bool
    dim: int


class SealedPrepareIn(BaseModel):
    """``POST /internal/sealed/prepare``: sealed enrollment, the first phase of a store whose share this party
    computes with its peer (an MPC "embed" job) instead of receiving it."""

    seq: int = Field(..., gt=0)
    gallery: str = _gallery(required=True)
    template_seq: int = Field(..., gt=0)
    job_id: str = Field(..., pattern=JOB_ID_PATTERN)
    sealed: SealedIn
    timeout_s: float | None = Field(None, gt=0)


class MatchIn(CheckIn):
    """``POST /internal/match``: one MPC match job; exactly one of ``query_share``, ``query_shares`` and
    ``sealed`` (verify only: the query is computed under MPC from the SDK's sealed feature shares)."""

    job_id: str = Field(..., pattern=JOB_ID_PATTERN)
    expected_committed: int | None = Field(None, ge=0, description="gateway's count of committed ops <= upto_seq")
    query_share: str | None = Field(None, repr=False)
    query_shares: list[str] | None = Field(None, min_length=1, max_length=MAX_QUERY_BATCH, repr=False,
                                           description="identify only: a batch of queries, one MPC job")
    sealed: SealedIn | None = Field(None, repr=False)
    threshold: float | None = Field(None, description="optional assertion: refused unless it equals the gallery's "
                                                      "recorded threshold (the party never takes it from here)")
    timeout_s: float | None = Field(None, gt=0)


class MatchOut(CheckOut):
    job_id: str
    share: str | None = None  # str(int): this party's additive share of the output, mod 2**64 (one query)
    shares: list[str] | None = None  # the same per query, in order, when the job carried query_shares


class StateOut(BaseModel):
    """``GET /internal/state``; the gateway's readiness probe passes it on as it is."""

    rank: int
    applied_through: int
    pending: list[int]
    committed_count: int
    versions: dict[str, dict[str, int]]  # per gallery: rows, deleted, dim (the key predates the gallery naming)
    mpc: dict[str, Any]
    jobs_run: int  # MPC jobs this process ran (a batch counts once)


class SealedKeyOut(BaseModel):
    """``GET /internal/sealed/key``: this party's public key for sealed mode (``secure/sealed_box.py``); the gateway
    relays both at ``GET /v1/sealed/keys`` and the SDK encrypts one feature share to each."""

    rank: int
    scheme: str
    public_key: str  # base64 of the raw 32-byte X25519 public key
    key_id: str


def output_text(value: int) -> str:
    """An output share as it travels: the residue mod 2^64 in decimal."""
    return str(int(value) % OUTPUT_MODULUS)
