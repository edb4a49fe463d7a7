"""Failpoints for crash tests: in test mode only, a named point can freeze the process so a test can
SIGKILL it at exactly that moment (e.g. between the two parties' acknowledgements of an enrollment).

Armed by PRIVFACE_FAILPOINTS (comma-separated names); the frozen process touches a file named after the point
in PRIVFACE_FAILPOINT_DIR so the test knows when to strike. Both are ignored unless PRIVFACE_ENV=test."""
from __future__ import annotations

import os
import time
from pathlib import Path

from common.settings import is_test_env

FAILPOINTS_ENV = "PRIVFACE_FAILPOINTS"
FAILPOINT_DIR_ENV = "PRIVFACE_FAILPOINT_DIR"
# name -> (default, meaning), for the README's configuration table (scripts/config_table.py)
VARIABLES = {
    FAILPOINTS_ENV: ("", "Test only (PRIVFACE_ENV=test): comma-separated failpoints at which the process freezes "
                         "so a crash test can kill it there (app/failpoints.py)."),
    FAILPOINT_DIR_ENV: (".", "Test only: where a frozen failpoint touches a file named after it."),
}


def failpoint(name: str) -> None:
    """Freeze here (touching `$PRIVFACE_FAILPOINT_DIR/<name>`) when armed; a no-op outside test mode."""
    if not is_test_env():
        return
    if name not in os.environ.get(FAILPOINTS_ENV, "").split(","):
        return
    Path(os.environ.get(FAILPOINT_DIR_ENV, "."), name).touch()
    time.sleep(3600)
