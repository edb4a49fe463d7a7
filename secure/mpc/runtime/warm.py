"""Warm MPC worker processes: each generation is forked from a fork server that has torch and CrypTen loaded.

Why: a generation ends whenever a peer or the dealer restarts, and a fresh "spawn" worker re-imports torch and
CrypTen (about 2 CPU-seconds, far more on a busy machine) before it can even start the rendezvous, so the
survivors came back seconds after the restarted process (issue 13: 13-30 s to serve again). Forked from the
warm server, a new generation is ready to rendezvous in well under a second. The fork server is a child of the
party (or dealer) process and dies with it (``preloaded.py``), and so does each worker
(``session.die_with_parent``). Nothing is shared between generations: each fork starts from the server's
freshly imported, never-used state (no gloo group, no keys, no data; keys are drawn after the fork, from the
OS: tests/test_mpc_restart.py). The main module (``privface.cli``) is not preloaded: multiprocessing re-runs it
in each worker anyway, and finding it already imported there only makes runpy warn.
"""
from __future__ import annotations

import multiprocessing as mp
import os
from multiprocessing.context import ForkServerContext, SpawnContext

PRELOAD = "secure.mpc.runtime.preloaded"  # imports torch and CrypTen (with the project's shims) once, in the server
# The pid of the process that owns the fork server, inherited by the server: preloaded.py refuses to serve once
# re-parented. Internal (set here, read there), not configuration.
OWNER_PID_VARIABLE = "_PRIVFACE_MPC_FORKSERVER_OWNER"


def start_worker_server() -> None:
    """Start the fork server now (it imports torch and CrypTen, seconds of CPU) so that a restarting party or
    dealer loads them while it imports and loads everything else, instead of after."""
    ctx = worker_context()
    if ctx.get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


def worker_context() -> ForkServerContext | SpawnContext:
    """The multiprocessing context of MPC workers: a fork server preloaded with torch and CrypTen (Linux and
    macOS); "spawn" where fork servers do not exist."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([PRELOAD])
    os.environ[OWNER_PID_VARIABLE] = str(os.getpid())  # the server starts at the first fork, from this process
    return ctx
