"""Model versions: register an exported model directory, activate one, and serve it from ONNX Runtime.

The registry (database rows) says which version is active; `ServedModels` is one gateway worker's view of
it: the loaded ORT sessions, swapped in place when a new version is activated (no request is dropped:
in-flight requests finish on the session they started with).
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.models import ModelVersion
from app.problems import Problem
from inference.metadata import ModelMetadata
from inference.operating_points import DEFAULT_FPIR, ImpostorCurve
from inference.privacy_presets import preset_of_transform
from inference.runtime import MicroBatcher, OrtEmbedder
from inference.transform import TransformSpec
from secure.thresholds import GalleryPolicy

log = logging.getLogger(__name__)


def register_model_dir(session: Session, model_root: Path, version_dir: Path) -> ModelVersion:
    """Register `version_dir` (model.json + ONNX file) as a candidate, after checking its checksum."""
    meta = ModelMetadata.load(version_dir, verify=True)
    existing = session.get(ModelVersion, meta.version)
    if existing is not None:
        if existing.sha256 != meta.sha256:
            raise ValueError(f"model version {meta.version} is already registered with another checksum")
        return existing
    path = str((version_dir / meta.onnx_file).resolve().relative_to(model_root.resolve()))
    owner = session.execute(select(ModelVersion.version).where(ModelVersion.path == path)).scalar_one_or_none()
    if owner is not None:  # e.g. an int8 copy put over its float source's directory: both would break
        raise ValueError(f"{path} is the file of registered version {owner}; put {meta.version} in a directory "
                         "of its own under the model directory")
    row = ModelVersion(
        version=meta.version, path=path, sha256=meta.sha256,
        transform_id=meta.transform_id, params_hash=meta.params_hash, embedding_dim=meta.embedding_dim,
        threshold=meta.threshold, metrics=meta.metrics, status="candidate", preset=preset_of_transform(meta.spec.name),
    )
    session.add(row)
    session.flush()
    return row


def activate_version(session: Session, version: str) -> ModelVersion:
    """Make `version` the active model of its privacy preset; the version it replaces (same preset) is
    retired, and its templates still match. Other presets' active versions are untouched."""
    row = session.get(ModelVersion, version)
    if row is None:
        raise Problem(404, "model-not-found", "Unknown model version", f"No model version {version!r}.")
    if row.status == "active":
        return row
    session.execute(update(ModelVersion).where(ModelVersion.status == "active", ModelVersion.preset == row.preset)
                    .values(status="retired"))
    row.status = "active"
    row.activated_at = datetime.now(timezone.utc)
    session.flush()
    return row


def active_version(session: Session, preset: str | None = None) -> ModelVersion | None:
    """The active version of `preset`; without a preset, the most recently activated of any preset."""
    query = select(ModelVersion).where(ModelVersion.status == "active")
    if preset is not None:
        query = query.where(ModelVersion.preset == preset)
    return session.execute(query.order_by(ModelVersion.activated_at.desc().nulls_last()).limit(1)).scalar_one_or_none()


def active_versions(session: Session) -> dict[str, ModelVersion]:
    """preset -> its active version."""
    rows = session.execute(select(ModelVersion).where(ModelVersion.status == "active")).scalars()
    return {row.preset: row for row in rows}


@dataclass
class LoadedModel:
    """One model version ready to embed: its transform, thresholds and ORT micro-batcher."""

    version: str
    spec: TransformSpec
    threshold: float
    embedding_dim: int
    embedder: OrtEmbedder
    batcher: MicroBatcher
    policy: GalleryPolicy  # what its galleries' match jobs run at (registered once at the parties)

    async def embed(self, features: np.ndarray) -> np.ndarray:
        return await self.batcher.embed(features)


class ServedModels:
    """The model versions this gateway worker has loaded, and which one is active for each privacy preset."""

    def __init__(self, model_root: Path, prefer_gpu: bool, batch_max: int, batch_wait_ms: float,
                 identify_fpir: float = DEFAULT_FPIR, default_preset: str = "accurate", ort_threads: int = 1) -> None:
        self._root = model_root
        self._ort_threads = ort_threads
        self._fpir = identify_fpir
        self._prefer_gpu = prefer_gpu
        self._batch = (batch_max, batch_wait_ms)
        self._loaded: dict[str, LoadedModel] = {}
        self._active: dict[str, str] = {}  # preset -> version
        self._lock = threading.Lock()
        self.default_preset = default_preset

    def for_preset(self, preset: str | None = None) -> LoadedModel:
        """The model serving `preset` (None: the gateway's default preset); 503 while none is active."""
        version = self._active.get(preset or self.default_preset)
        if version is None:
            raise Problem(503, "no-active-model", "No active model version",
                          f"No model version is active for the privacy preset {preset or self.default_preset!r}; "
                          "an admin must activate one.", headers={"Retry-After": "5"})
        return self._loaded[version]

    @property
    def active(self) -> LoadedModel:
        """The default preset's model."""
        return self.for_preset(None)

    @property
    def active_version(self) -> str | None:
        """The default preset's active version (None when it has none)."""
        return self._active.get(self.default_preset)

    @property
    def active_by_preset(self) -> dict[str, str]:
        return dict(self._active)

    def get(self, row: ModelVersion) -> LoadedModel:
        """The loaded model for a registry row, loading (and checksumming) it on first use."""
        with self._lock:
            if row.version not in self._loaded:
                self._loaded[row.version] = self._load(row)
            return self._loaded[row.version]

    def switch_to(self, row: ModelVersion) -> None:
        """Load `row` if needed, then point new requests of its preset at it (in-flight ones finish where they are)."""
        model = self.get(row)
        if self._active.get(row.preset) != model.version:
            log.info("serving model version %s for preset %s (providers %s)", model.version, row.preset,
                     model.embedder.providers)
        self._active[row.preset] = model.version

    def by_transform(self, transform_id: str, params_hash: str) -> LoadedModel | None:
        for model in list(self._loaded.values()):
            if model.spec.transform_id == transform_id and model.spec.params_hash == params_hash:
                return model
        return None

    def providers(self) -> dict[str, list[str]]:
        return {version: model.embedder.providers for version, model in self._loaded.items()}

    def _load(self, row: ModelVersion) -> LoadedModel:
        path = self._root / row.path
        meta = ModelMetadata.load(path.parent, verify=True)
        if meta.sha256 != row.sha256:
            raise RuntimeError(f"model file {path} does not match its registered checksum")
        threads = self._ort_threads or None  # 0: ORT's default (a spinning thread per core)
        embedder = OrtEmbedder(path, prefer_gpu=self._prefer_gpu, intra_op_threads=threads,
                               spin=False if threads else None)
        batcher = MicroBatcher(embedder, max_batch=self._batch[0], max_wait_ms=self._batch[1])
        return LoadedModel(row.version, meta.spec, row.threshold, row.embedding_dim, embedder, batcher,
                           gallery_policy(meta, row.threshold, self._fpir))


def gallery_policy(meta: ModelMetadata, verify_threshold: float, fpir: float) -> GalleryPolicy:
    """Verify at the version's served threshold; identify by the schedule that holds ``fpir`` per search (from
    the version's impostor curve; never below the verify threshold). A version without a curve (exported
    before calibration existed) identifies at the verify threshold: its false matches grow with N."""
    if not meta.impostor_curve:
        log.warning("model %s has no impostor curve: identify uses the 1:1 threshold at every gallery size",
                    meta.version)
        return GalleryPolicy(float(verify_threshold))
    curve = ImpostorCurve.from_dict(meta.impostor_curve)
    schedule = curve.identify_schedule(fpir, floor=float(verify_threshold))
    return GalleryPolicy(float(verify_threshold), tuple((int(n), float(t)) for n, t in schedule))
