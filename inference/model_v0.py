"""Model v0 on disk: exported once (first start), reused by every later start without loading torch or onnx.

Why a module of its own: every gateway start and every `privface models ensure` asks for v0, and nearly always it is
already there. Checking it needs only model.json and a checksum; exporting it needs torch and onnx (~2 s of imports
per process, ~28 test stacks per suite run). So the check lives here and `inference.export` is imported only when
an export must really happen.
"""

from __future__ import annotations

import fcntl
from pathlib import Path

from inference.metadata import ModelMetadata

VERSION = "v0"


def ensure_model_v0(model_dir: Path, shared_dir: Path, eval_pairs: int = 600) -> Path:
    """MODEL_DIR/v0, exported (with metrics and threshold) only if absent or not matching its checksum.

    Gateway workers may call this together at first start: a lock file makes one export, the rest reuse it.
    An export appears atomically (inference.export renames a finished folder), so a valid folder seen without the
    lock is complete.
    """
    model_dir = Path(model_dir)
    version_dir = model_dir / VERSION
    if valid_version_dir(version_dir):
        return version_dir
    model_dir.mkdir(parents=True, exist_ok=True)
    with (model_dir / f".{VERSION}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not valid_version_dir(version_dir):
            from inference import export  # torch and onnx: only when there is something to export

            export.export_version(VERSION, model_dir, Path(shared_dir), eval_pairs)
    return version_dir


def valid_version_dir(version_dir: Path) -> bool:
    """A complete export: checksum right, and calibrated (an export from before calibration is redone)."""
    try:
        return bool(ModelMetadata.load(version_dir, verify=True).impostor_curve)
    except (ValueError, OSError, TypeError, KeyError):
        return False
