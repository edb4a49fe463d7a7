"""Where the project and its data live: defined once so that every process agrees on the same folders."""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
VAR_DIR = PROJECT_ROOT / "var"  # local databases, model versions, keys of the embedded stack
DEFAULT_SHARED_DIR = PROJECT_ROOT.parent / "shared"  # read-only face data and pretrained models
SHARED_DIR_ENV = "PRIVFACE_SHARED_DIR"


def shared_dir() -> Path:
    """The read-only data folder: PRIVFACE_SHARED_DIR, else ../shared beside the project (absolute)."""
    return Path(os.environ.get(SHARED_DIR_ENV, DEFAULT_SHARED_DIR)).resolve()
