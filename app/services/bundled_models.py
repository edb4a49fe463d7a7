"""The trained model versions shipped in the repository, installed at first start.

Why: `make run` on a fresh machine must serve the trained models (one per privacy preset), not the untrained
v0 exported from the pixel network. Each bundled version is a directory (model.onnx + model.json with its
checksum, metrics and impostor curve) under the `bundled_model_dir` setting; installing copies it into the
model directory (the registry stores paths relative to it), registers it, and activates it only when its
preset has no active version yet — so an admin's later choice is never overridden by a restart.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from sqlalchemy.orm import Session

from app.services.model_registry import activate_version, active_version, register_model_dir
from inference.metadata import ModelMetadata

log = logging.getLogger(__name__)


def bundled_versions(bundled_dir: Path | None) -> list[Path]:
    """Bundled version directories, checksums verified (a damaged bundle is an error, not silently skipped)."""
    if bundled_dir is None or not str(bundled_dir) or not Path(bundled_dir).is_dir():
        return []
    found = sorted(p for p in Path(bundled_dir).iterdir() if (p / "model.json").is_file())
    for version_dir in found:
        ModelMetadata.load(version_dir, verify=True)
    return found


def copy_version(source: Path, model_dir: Path) -> Path:
    """MODEL_DIR/<name>, copied from `source` unless an identical copy is there; atomic (copy, then rename)."""
    target = Path(model_dir) / source.name
    expected = ModelMetadata.load(source, verify=True).sha256
    try:
        if ModelMetadata.load(target, verify=True).sha256 == expected:
            return target
    except (ValueError, OSError, KeyError, TypeError):
        pass
    Path(model_dir).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{source.name}-", dir=model_dir))
    shutil.copytree(source, staging, dirs_exist_ok=True)
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return target


def install_bundled(session: Session, model_dir: Path, bundled_dir: Path | None) -> list[str]:
    """Register every bundled version; activate those whose preset has none active. Returns the activated."""
    activated = []
    for source in bundled_versions(bundled_dir):
        row = register_model_dir(session, model_dir, copy_version(source, model_dir))
        if active_version(session, row.preset) is None:
            activate_version(session, row.version)
            activated.append(row.version)
            log.info("activated bundled model %s for preset %s", row.version, row.preset)
    return activated
