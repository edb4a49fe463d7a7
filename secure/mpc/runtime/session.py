"""What every MPC process (party worker or dealer) sets up: its tie to its supervisor, its device, its CrypTen
session (our rendezvous store, gloo timeouts, CrypTen's randomness from AES-CTR).

A worker dies with its supervisor (PR_SET_PDEATHSIG along party -> fork server -> worker, plus a watchdog on the
party's sentinel), so a SIGKILLed party takes its gloo sockets with it, and it leaves without running destructors (a broken gloo group can hang them).
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time
from datetime import timedelta
from types import ModuleType
from typing import Any

from secure.mpc.settings import DEALER, MpcSettings


def die_with_parent_thread() -> None:
    """SIGKILL this process the moment the thread that started it ends (PR_SET_PDEATHSIG, Linux; elsewhere a
    no-op). Kernel-level, so it works while Python code is stuck in a long computation holding the GIL."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the watchdog of die_with_parent still works
        pass


def die_with_parent() -> None:
    """End this worker as soon as the party (or dealer) process that started it dies.

    The worker's direct parent is the party's fork server (``warm.py``), which itself dies with the party
    (``preloaded.py``): PR_SET_PDEATHSIG along that chain ends the worker at once. A watchdog thread also
    waits on multiprocessing's sentinel of the starting process, for systems without PR_SET_PDEATHSIG."""
    die_with_parent_thread()
    owner = multiprocessing.parent_process()
    if owner is None:  # not started by multiprocessing: nothing to watch
        return
    if not owner.is_alive():
        os._exit(70)
    sentinel = owner.sentinel

    def watch() -> None:
        multiprocessing.connection.wait([sentinel])
        os._exit(70)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def wait_for_listener(host: str, port: int, timeout_s: float, pause_s: float = 0.05) -> None:
    """Return once ``host:port`` accepts connections (or after ``timeout_s``: the store then reports the failure).

    torch's TCPStore client retries a refused connection with growing pauses, so it joined seconds after a
    restarted party 0 was listening again; polling here joins within ``pause_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=max(pause_s, 0.2)):
                return
        except OSError:
            time.sleep(pause_s)


def exit_now(outq: Any, code: int) -> None:
    """Flush the out-queue and leave without running destructors (a broken gloo group can hang them)."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        if outq is not None:
            outq.close()
            outq.join_thread()
    finally:
        os._exit(code)


def resolve_device(choice: str) -> str:
    import torch

    if choice == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("PRIVFACE_MPC_DEVICE=cuda but torch sees no GPU")
        return "cuda"
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu"


def init_crypten(rank: int, settings: MpcSettings) -> ModuleType:
    """crypten.init() for ``rank`` with our rendezvous store and gloo timeouts; returns the crypten module."""
    from secure.mpc.settings import tfp_allowed

    threads = int(settings.torch_threads or 0)
    if threads:
        import torch

        torch.set_num_threads(threads)

    if settings.provider == "TFP" and not tfp_allowed():  # defence in depth (the settings validator also checks)
        raise RuntimeError("provider TFP refused outside PRIVFACE_ENV=test")
    settings.check_transport(rank)
    parties = 2
    os.environ.update({"DISTRIBUTED_BACKEND": "gloo", "WORLD_SIZE": str(parties), "RANK": str(rank),
                       "RENDEZVOUS": f"tcp://{settings.master_addr}:{settings.master_port}"})
    if settings.gloo_ifname:
        from secure.mpc.runtime.interfaces import gloo_interface

        os.environ["GLOO_SOCKET_IFNAME"] = gloo_interface(settings.gloo_ifname)

    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    from secure.mpc.runtime.crypten_compat import load_crypten

    op_timeout = timedelta(seconds=float(settings.op_timeout_s))
    connect_timeout = timedelta(seconds=float(settings.connect_timeout_s))
    # new_group() (CrypTen makes three) takes the module default; init_process_group gets it explicitly.
    c10d.default_pg_timeout = op_timeout
    original = dist.init_process_group

    def init_process_group(backend: Any = None, init_method: Any = None, world_size: int = -1, rank: int = -1,
                           **kwargs: Any) -> Any:
        if rank != 0:  # join as soon as rank 0's store listens (torch's own retries back off for seconds)
            wait_for_listener(settings.master_addr, int(settings.master_port), float(settings.connect_timeout_s))
        # torch's stubs do not re-export TCPStore from torch.distributed
        store = dist.TCPStore(settings.master_addr, int(settings.master_port), world_size,  # type: ignore[attr-defined]
                              rank == 0,
                              timeout=connect_timeout, wait_for_workers=False)
        # the rendezvous waits connect_timeout for the others (a restarted peer is still starting: waiting only
        # op_timeout failed the attempt and cost a new one); then operations get op_timeout again
        group = original(backend=backend, store=store, world_size=world_size, rank=rank, timeout=connect_timeout)
        c10d._set_pg_timeout(op_timeout)
        return group

    setattr(dist, "init_process_group", init_process_group)  # noqa: B010 - a patch, on purpose
    crypten = load_crypten()  # with CrypTen's randomness routed through AES-CTR (crypten_rng.py)
    if rank != DEALER:
        from secure.mpc.runtime import crypten_rng

        crypten_rng.configure(settings.link_secret(rank, DEALER))
    crypten.cfg.mpc.provider = settings.provider
    crypten.cfg.communicator.verbose = True  # per-job traffic stats (bytes, rounds) for the benchmarks
    crypten.init()
    return crypten
