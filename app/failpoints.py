"""Failpoints for crash tests: in test mode only, a named point can freeze the process so a test can
SIGKILL it at exactly that moment (e.g. between the two parties' acknowledgements of an enrollment)."""
from __future__ import annotations

import os
import time
from pathlib import Path


def failpoint(name: str) -> None:
    """Freeze here (touching `$PRIVFACE_FAILPOINT_DIR/<name>`) when armed; a no-op outside test mode."""
    if os.environ.get("PRIVFACE_ENV") != "test":
        return
    if name not in os.environ.get("PRIVFACE_FAILPOINTS", "").split(","):
        return
    Path(os.environ.get("PRIVFACE_FAILPOINT_DIR", "."), name).touch()
    time.sleep(3600)
