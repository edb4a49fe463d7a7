"""Imported once, by the MPC fork server only (``warm.py``): torch, CrypTen and the worker modules are loaded
so that each new worker generation forks with them, and the server is tied to the party's (or dealer's) life.

Why the tie: multiprocessing keeps a fork server alive while any child it forked lives, and a worker would
only notice through a watchdog thread (slow while a computation holds the GIL). With PR_SET_PDEATHSIG here
and in each worker, a SIGKILLed party takes the server and the worker with it at once, so its peer sees the
MPC link close immediately (tests/test_mpc_recovery.py, tests/test_mpc_restart.py).
"""
from __future__ import annotations

import os

from secure.mpc.dealer import server as dealer_server  # noqa: F401
from secure.mpc.runtime import worker  # noqa: F401
from secure.mpc.runtime.crypten_compat import load_crypten
from secure.mpc.runtime.session import die_with_parent_thread

die_with_parent_thread()
if os.getppid() == 1:  # the party died before the line above: do not serve
    os._exit(70)
load_crypten()
