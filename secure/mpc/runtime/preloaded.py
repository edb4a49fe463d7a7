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
from secure.mpc.runtime.warm import OWNER_PID_VARIABLE

die_with_parent_thread()
# The party died before the line above (this server was re-parented): do not serve. Compared with the pid the
# party recorded, not with 1: in a container the party itself is pid 1 (tests/test_compose_stack.py).
if str(os.getppid()) != os.environ.get(OWNER_PID_VARIABLE, str(os.getppid())):
    os._exit(70)
load_crypten()
