"""The gateway's one settings object (environment variables with the PRIVFACE_ prefix).

Every default is the embedded local stack: SQLite, two local parties, in-process jobs when no Redis.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from typing import Annotated, Literal, TypedDict

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from common.paths import DEFAULT_SHARED_DIR, PROJECT_ROOT, VAR_DIR
from common.settings import DEV_PARTY_TOKENS, DEV_SECRET_KEY, DEV_TOKENS, TEST_ENV
from inference.operating_points import CALIBRATION_IMAGES, MIN_CALIBRATION_IMAGES


class PartyTLS(TypedDict, total=False):
    """PartyPair's TLS keywords, as the settings give them."""

    tls_verify: str
    client_cert: tuple[str, str | None]


class GatewaySettings(BaseSettings):
    """Configuration of the API gateway process (and of `privface run`)."""

    model_config = SettingsConfigDict(env_prefix="PRIVFACE_", extra="ignore")

    env: str = Field("production", description="'production', 'development' or 'test'.")
    database_url: str = Field(
        f"sqlite:///{VAR_DIR / 'gateway.db'}", description="Gateway database (SQLAlchemy URL)."
    )
    redis_url: str | None = Field(None, description="Redis for jobs, model events, replay protection, abuse budgets; unset = in-process.")
    shared_dir: Path = Field(DEFAULT_SHARED_DIR, description="Read-only data and pretrained models.")
    model_dir: Path = Field(VAR_DIR / "models", description="Where model versions (ONNX + metadata) live.")
    bundled_model_dir: Path | None = Field(
        PROJECT_ROOT / "inference" / "bundled", description="Trained model versions shipped in the repository "
        "(one per privacy preset); the first start registers them and activates each preset that has no active "
        "version. Empty: none (the untrained v0 is exported instead).")
    secret_key: str = Field(
        DEV_SECRET_KEY, description="Master secret: derives tenant template keys and hashes API keys."
    )
    party_urls: Annotated[tuple[str, str], NoDecode] = Field(
        ("http://127.0.0.1:8101", "http://127.0.0.1:8102"), description="Internal URLs of party 0 and party 1."
    )
    party0_token: str = Field(DEV_PARTY_TOKENS[0], description="Bearer token of the gateway -> party 0 link only.")
    party1_token: str = Field(DEV_PARTY_TOKENS[1], description="Bearer token of the gateway -> party 1 link only.")
    party_ca_file: str | None = Field(None, description="CA bundle that signed the parties' server certificates.")
    party_client_cert: str | None = Field(None, description="The gateway's client certificate (PEM) for mTLS.")
    party_client_key: str | None = Field(None, description="Its private key (PEM).")
    party_timeout_s: float = Field(15.0, description="Deadline for one party call, MPC included.")
    party_jobs_in_flight: int = Field(
        8, ge=1, description="MPC jobs this gateway process has in flight at the parties at once; more wait at the "
                             "gateway, in order, up to party_timeout_s (secure/pacing.py).")
    party_jobs_per_s: float = Field(
        18.0, gt=0, description="MPC jobs this gateway process starts per second: keep it under the parties' "
                                "PRIVFACE_PARTY_MATCH_RATE_PER_S divided by the number of gateway processes.")
    party_jobs_burst: int = Field(20, ge=1, description="Jobs allowed at once above party_jobs_per_s (under the "
                                                        "parties' PRIVFACE_PARTY_MATCH_BURST).")
    party_precheck: Literal["always", "after-refusal"] = Field(
        "after-refusal", description="When the gateway asks both parties, before an MPC job, whether they hold its "
                                     "snapshot: 'after-refusal' (a gallery's first job, and after a job that did not "
                                     "run at both parties) or 'always' (docs/operations.md \"The precheck\").")
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines of every privface process (gateway, parties, dealer): 'text', or 'json' "
                            "(one object per line); each carries the request id (X-Request-ID, docs/operations.md).")
    identify_fpir: float = Field(
        0.01, gt=0, lt=1, description="Target false-positive identification rate per identify search (an unenrolled "
                                      "person matched to someone): the identify threshold rises with the gallery "
                                      "size to hold it (inference/operating_points.py, docs/security.md).")
    quality_gate: bool = Field(
        True, description="Refuse features that carry no face (flat, empty, noise, blur) with a 422 "
                          "no-face-in-features before embedding them; a quality check, not a security boundary "
                          "(docs/quality_gate.md). false: every valid payload is embedded and matched.")
    max_body_bytes: int = Field(256 * 1024, description="Largest accepted request body.")
    sealed_max_body_bytes: int = Field(
        1024 * 1024, description="Largest accepted body on the sealed-mode routes (/v1/sealed/...): two envelopes of "
                                 "int64 feature shares, ~150 kB each for the bundled sealed model.")
    sealed_model_dir: Path | None = Field(
        PROJECT_ROOT / "inference" / "bundled", description="Sealed mode: directory of sealed model versions "
        "(<version>/sealed.json + layers.npz, inference/sealed_export.py). Empty: sealed mode is not served.")
    sealed_model_version: str = Field(
        "sealed-v7", description="Sealed mode: the sealed model version served to tenants in mode 'sealed' (the "
                                 "parties must serve the same one: PRIVFACE_PARTY_SEALED_MODEL_DIR).")
    default_epsilon_max: float | None = Field(None, description="Default tenant ceiling on the per-image ε (None: any).")
    replay_window_s: int = Field(
        600, ge=1, description="A payload is accepted while its created_at is at most this old (created_at is "
                               "mandatory); its nonce is remembered for this window plus the clock skew, so the "
                               "same bytes are accepted at most once, ever.")
    clock_skew_s: int = Field(300, ge=0, description="How far in the future a payload's created_at may lie.")
    rate_window_s: int = Field(60, ge=1, description="Per-API-key budgets: the window they count in.")
    rate_verify_per_key: int = Field(600, ge=0, description="Verify requests one API key may make per window (0: no limit).")
    rate_identify_per_key: int = Field(300, ge=0, description="Identify requests one API key may make per window (0: no limit).")
    rate_enroll_per_key: int = Field(300, ge=0, description="Enrollments one API key may make per window (0: no limit).")
    subject_verify_limit: int = Field(20, ge=0, description="Verify requests against one subject (per tenant) per "
                                                            "subject_verify_window_s (0: no limit).")
    subject_verify_window_s: int = Field(3600, ge=1, description="Window of the per-subject verify budget.")
    lockout_failures: int = Field(5, ge=0, description="Consecutive failed verifies (non-matches) of one subject "
                                                       "that lock it for verify (0: never lock).")
    lockout_window_s: int = Field(900, ge=1, description="The failures must fall within this window (from the first).")
    lockout_s: int = Field(900, ge=0, description="How long a lock-out lasts; 0: until an admin unlocks the subject.")
    batch_max: int = Field(32, description="Micro-batching: largest ORT batch.")
    batch_wait_ms: float = Field(2.0, description="Micro-batching: longest wait for a batch to fill.")
    ort_threads: int = Field(
        1, ge=0, description="ONNX Runtime threads per model session, without spinning (0: ORT's default, one "
                             "spinning thread per core). One costs the least CPU per embedding on a CPU shared "
                             "with the event loop and the MPC traffic (docs/operations.md); use --workers for more "
                             "cores.")
    identify_batch_wait_ms: float = Field(
        5.0, description="Identify batching: how long the first of concurrent identify requests (same gallery and "
                         "snapshot) waits for others to share its MPC job; 0 disables batching.")
    identify_batch_max: int = Field(16, description="Identify batching: most queries in one MPC job (at most 64).")
    prefer_gpu: bool = Field(True, description="Use ONNX Runtime's CUDA provider when present.")
    model_poll_s: float = Field(5.0, description="Fallback poll of the active model version when Redis is absent.")
    default_preset: str = Field(
        "accurate", description="Privacy preset of tenants that chose none (accurate | balanced | strict; "
                                "docs/models/presets.md): which transform their SDK applies and which model serves "
                                "them. The default is the most private preset whose model reaches 98% held-out accuracy.")
    federated_python: Path = Field(
        PROJECT_ROOT / ".venv-federated" / "bin" / "python",
        description="Python of the federated environment (scripts/install_federated.sh) that runs federated jobs.")
    federated_tolerance: float = Field(
        0.005, ge=0, le=1, description="A federated candidate is activated only if its held-out accuracy is at most "
                                       "this much below the active version's (same pairs); else it stays a candidate.")
    federated_calibration_images: int = Field(
        CALIBRATION_IMAGES, ge=MIN_CALIBRATION_IMAGES,
        description="Images (people in no View-2 fold) on which a federated candidate's impostor curve and served "
                    "threshold are measured at export; fewer exports faster with a coarser curve.")
    federated_calibration_faces: Path | None = Field(
        None, description="A face folder laid out as LFW whose people no model here trained on (e.g. the CelebA "
                          "validation set of training_jobs/validation_set.py): a federated candidate's served threshold "
                          "is calibrated on them instead of on LFW's no-fold people, who are training people "
                          "(docs/sealed.md: thresholds calibrated on training people let through more new impostors).")
    federated_state_dir: Path = Field(
        PROJECT_ROOT / "var" / "federated", description="Per-round state of running federated jobs (resume after a "
                                                        "worker restart); removed when a job ends.")
    federated_superlink: str = Field(
        "", description="HOST:PORT of the Flower SuperLink's Control API that federated jobs with engine deployment "
                        "submit their run to (real devices); set by the operator, never by a request. Its ServerApp "
                        "must see PRIVFACE_FEDERATED_STATE_DIR at the same path. Empty: engine deployment is refused.")
    federated_superlink_root_certificates: Path | None = Field(
        None, description="PEM file of the CA that signed the SuperLink's TLS certificate (engine deployment).")
    federated_superlink_insecure: bool = Field(
        False, description="Talk to the SuperLink in plain text (a SuperLink on loopback only; tests).")
    job_lease_s: float = Field(
        60.0, gt=0, description="A running job whose heartbeat (every third of this) is older than this is "
                                "orphaned: a federated job is resumed, any other failed.")
    host: str = Field("127.0.0.1", description="Gateway listen address.")
    port: int = Field(8000, description="Gateway listen port.")

    @field_validator("bundled_model_dir", "sealed_model_dir", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value in ("", None) else value

    @field_validator("default_preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        from inference.privacy_presets import check_preset
        return check_preset(value)

    @field_validator("party_urls", mode="before")
    @classmethod
    def _split_urls(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @property
    def nonce_ttl_s(self) -> int:
        """How long a nonce is remembered: derived, never configured, so it always covers the whole window in
        which the same payload could pass the freshness check (stamped up to clock_skew_s ahead, accepted until
        replay_window_s after its stamp), plus one second for Redis' whole-second expiry."""
        return self.replay_window_s + self.clock_skew_s + 1

    @property
    def is_test(self) -> bool:
        return self.env == TEST_ENV

    @property
    def party_tokens(self) -> tuple[str, str]:
        return (self.party0_token, self.party1_token)

    def party_tls(self) -> PartyTLS:
        """PartyPair's TLS keywords: verify the parties with our CA, present our client certificate."""
        opts: PartyTLS = {}
        if self.party_ca_file:
            opts["tls_verify"] = self.party_ca_file
        if self.party_client_cert:
            opts["client_cert"] = (self.party_client_cert, self.party_client_key)
        return opts

    def refuse_dev_secrets_off_loopback(self) -> None:
        """The embedded defaults are for one machine: a gateway reachable from elsewhere needs real secrets."""
        loopback = self.host in ("127.0.0.1", "localhost", "::1")
        dev = [name for name, value in (("PRIVFACE_SECRET_KEY", self.secret_key),
                                        ("PRIVFACE_PARTY0_TOKEN", self.party0_token),
                                        ("PRIVFACE_PARTY1_TOKEN", self.party1_token))
               if value == DEV_SECRET_KEY or value in DEV_TOKENS]
        if dev and not loopback:
            raise SystemExit(f"error: {', '.join(dev)} still hold development defaults; set real secrets "
                             f"before listening on {self.host}")
        if self.party0_token == self.party1_token and not loopback:
            raise SystemExit("error: PRIVFACE_PARTY0_TOKEN and PRIVFACE_PARTY1_TOKEN must differ (one per link)")


@lru_cache
def get_settings() -> GatewaySettings:
    """The process-wide settings (tests build their own and pass them to `create_app`)."""
    return GatewaySettings()
