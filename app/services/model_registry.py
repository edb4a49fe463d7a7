"""Model versions: register an exported model directory, activate one, and serve it from ONNX Runtime.

The registry (database rows) says which version is active; `ServedModels` is one gateway worker's view of
it: the loaded ORT sessions, swapped in place when a new version is activated (no request is dropped:
in-flight requests finish on the session they started with).
"""
from __future__ import annotations

import hashlib
import json
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
from inference.runtime import MicroBatcher, OrtEmbedder
from inference.transform import TransformSpec

log = logging.getLogger(__name__)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def register_model_dir(session: Session, model_root: Path, version_dir: Path) -> ModelVersion:
    """Register `version_dir` (model.json + ONNX file) as a candidate, after checking its checksum."""
    meta = json.loads((version_dir / "model.json").read_text())
    onnx_path = version_dir / meta.get("onnx_file", "model.onnx")
    actual = file_sha256(onnx_path)
    if actual != meta["sha256"]:
        raise ValueError(f"{onnx_path}: sha256 {actual} does not match model.json's {meta['sha256']}")
    existing = session.get(ModelVersion, meta["version"])
    if existing is not None:
        if existing.sha256 != actual:
            raise ValueError(f"model version {meta['version']} is already registered with another checksum")
        return existing
    spec = TransformSpec.from_dict(meta["transform"])
    row = ModelVersion(
        version=meta["version"], path=str(onnx_path.resolve().relative_to(model_root.resolve())), sha256=actual,
        transform_id=spec.transform_id, params_hash=spec.params_hash, embedding_dim=int(meta["embedding_dim"]),
        threshold=float(meta["threshold"]), metrics=meta.get("metrics", {}), status="candidate",
    )
    session.add(row)
    session.flush()
    return row


def activate_version(session: Session, version: str) -> ModelVersion:
    """Make `version` the active model; the previously active one is retired (its templates still match)."""
    row = session.get(ModelVersion, version)
    if row is None:
        raise Problem(404, "model-not-found", "Unknown model version", f"No model version {version!r}.")
    if row.status == "active":
        return row
    session.execute(update(ModelVersion).where(ModelVersion.status == "active").values(status="retired"))
    row.status = "active"
    row.activated_at = datetime.now(timezone.utc)
    session.flush()
    return row


def active_version(session: Session) -> ModelVersion | None:
    return session.execute(select(ModelVersion).where(ModelVersion.status == "active")).scalar_one_or_none()


@dataclass
class LoadedModel:
    """One model version ready to embed: its transform, threshold and ORT micro-batcher."""

    version: str
    spec: TransformSpec
    threshold: float
    embedding_dim: int
    embedder: OrtEmbedder
    batcher: MicroBatcher

    async def embed(self, features: np.ndarray) -> np.ndarray:
        return await self.batcher.embed(features)


class ServedModels:
    """The model versions this gateway worker has loaded, and which one is active."""

    def __init__(self, model_root: Path, prefer_gpu: bool, batch_max: int, batch_wait_ms: float) -> None:
        self._root = model_root
        self._prefer_gpu = prefer_gpu
        self._batch = (batch_max, batch_wait_ms)
        self._loaded: dict[str, LoadedModel] = {}
        self._active: str | None = None
        self._lock = threading.Lock()

    @property
    def active(self) -> LoadedModel:
        version = self._active
        if version is None:
            raise Problem(503, "no-active-model", "No active model version", "An admin must activate a model.",
                          headers={"Retry-After": "5"})
        return self._loaded[version]

    @property
    def active_version(self) -> str | None:
        return self._active

    def get(self, row: ModelVersion) -> LoadedModel:
        """The loaded model for a registry row, loading (and checksumming) it on first use."""
        with self._lock:
            if row.version not in self._loaded:
                self._loaded[row.version] = self._load(row)
            return self._loaded[row.version]

    def switch_to(self, row: ModelVersion) -> None:
        """Load `row` if needed, then point new requests at it (in-flight ones finish where they are)."""
        model = self.get(row)
        if self._active != model.version:
            log.info("serving model version %s (providers %s)", model.version, model.embedder.providers)
        self._active = model.version

    def by_transform(self, transform_id: str, params_hash: str) -> LoadedModel | None:
        for model in list(self._loaded.values()):
            if model.spec.transform_id == transform_id and model.spec.params_hash == params_hash:
                return model
        return None

    def providers(self) -> dict[str, list[str]]:
        return {version: model.embedder.providers for version, model in self._loaded.items()}

    def _load(self, row: ModelVersion) -> LoadedModel:
        path = self._root / row.path
        if file_sha256(path) != row.sha256:
            raise RuntimeError(f"model file {path} does not match its registered checksum")
        meta = json.loads((path.parent / "model.json").read_text())
        embedder = OrtEmbedder(path, prefer_gpu=self._prefer_gpu)
        batcher = MicroBatcher(embedder, max_batch=self._batch[0], max_wait_ms=self._batch[1])
        return LoadedModel(row.version, TransformSpec.from_dict(meta["transform"]), row.threshold,
                           row.embedding_dim, embedder, batcher)
