"""The dealer (rank 2): CrypTen's trusted-third-party provider of Beaver triples and masks.

``run_dealer(settings)`` blocks forever: each generation is a process (``dealer_server.dealer_main``) that joins
the parties' gloo group, agrees a session key with each party, and answers party 0's requests (whitelisted:
``dealer_server.DEALER_FUNCTIONS``). It never receives any share of data. When the group breaks (a party died,
timed out, or restarted) the worker exits and a new generation rendezvous-es again after retry_backoff_s.
"""
from __future__ import annotations

import logging
import threading

from secure.mpc.runtime.warm import worker_context
from secure.mpc.settings import MpcSettings

log = logging.getLogger("privface.dealer")


def run_dealer(settings: MpcSettings | None = None, stop_event: threading.Event | None = None) -> None:
    """Serve as the dealer until ``stop_event`` is set (never, for the ``privface dealer`` command)."""
    from secure.mpc.dealer import server as dealer_server

    settings = settings or MpcSettings()
    if settings.provider != "TTP":
        raise ValueError("the dealer is only used with provider TTP")
    stop = stop_event or threading.Event()
    ctx = worker_context()  # each generation forks warm (torch and CrypTen loaded): warm.py
    data = settings.model_dump()
    generation = 0
    while not stop.is_set():
        generation += 1
        proc = ctx.Process(target=dealer_server.dealer_main, args=(data, generation),
                           name=f"privface-dealer-g{generation}", daemon=True)
        proc.start()
        while proc.is_alive() and not stop.is_set():
            proc.join(0.2)
        if proc.is_alive():
            proc.kill()
            proc.join(2.0)
        log.info("dealer generation %d ended (exit code %s)", generation, proc.exitcode)
        stop.wait(settings.retry_backoff_s)
