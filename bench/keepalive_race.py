"""The keep-alive race of issue 13, measured: the gateway's party link against a real uvicorn.

A real uvicorn closes idle connections after ``--keep-alive`` seconds; the gateway's link (``secure/partylink.py``:
its pooled client and ``send``) calls it with gaps swept evenly from ``--gap-lo`` to ``--gap-hi`` times the
keep-alive, so some calls reach the server just as its timer closes the reused connection. Reported: failures
(no answer) by error. Settings: ``before`` = the pool forgets a connection when the party does (the 5 s / 5 s of
httpx's and uvicorn's defaults, scaled), no resend; ``pool`` = the pool idle time at the production ratio
(``POOL_IDLE_S / KEEP_ALIVE_S``), no resend; ``fixed`` = that, and the resend of an idempotent call.

    python -m bench.keepalive_race [--keep-alive 1] [--calls 60] [--settings before,pool,fixed]
"""
from __future__ import annotations

import argparse
import asyncio
import threading
import time
from collections import Counter
from typing import Any

import uvicorn

from devtools.net import free_port
from secure.party.api import KEEP_ALIVE_S
from secure.partylink import POOL_IDLE_S, make_client, send


async def _empty_json(scope: dict[str, Any], receive: Any, send_: Any) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send_({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send_({"type": "http.response.body", "body": b"{}"})




async def _sweep(url: str, pool_idle_s: float, resend: bool, keep_alive: int, calls: int, lo: float,
                 hi: float) -> Counter[str]:
    failures: Counter[str] = Counter()
    client = make_client(url, "bench", 5.0, True, 1, pool_idle_s)
    async with client:
        await send(client, 0, "POST", "/x", {}, 5.0, idempotent=resend)
        for i in range(calls):
            await asyncio.sleep(keep_alive * (lo + (hi - lo) * i / max(1, calls - 1)))
            reply = await send(client, 0, "POST", "/x", {"i": i}, 5.0, idempotent=resend)
            if reply.status != 200:
                failures[type(reply.error).__name__ if reply.error else str(reply.status)] += 1
    return failures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keep-alive", type=int, default=1, help="the server's keep-alive timeout (s)")
    ap.add_argument("--calls", type=int, default=60)
    ap.add_argument("--gap-lo", type=float, default=0.990, help="shortest gap, times the keep-alive")
    ap.add_argument("--gap-hi", type=float, default=1.005, help="longest gap, times the keep-alive")
    ap.add_argument("--settings", default="before,pool,fixed")
    args = ap.parse_args()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(_empty_json, host="127.0.0.1", port=port, lifespan="off",
                                           timeout_keep_alive=args.keep_alive, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    ratio = POOL_IDLE_S / KEEP_ALIVE_S
    settings = {"before": (1.0, False), "pool": (ratio, False), "fixed": (ratio, True)}
    try:
        for name in args.settings.split(","):
            share, resend = settings[name]
            failures = asyncio.run(_sweep(f"http://127.0.0.1:{port}", args.keep_alive * share, resend,
                                          args.keep_alive, args.calls, args.gap_lo, args.gap_hi))
            print(f"{name}: keep-alive {args.keep_alive} s, pool idle {args.keep_alive * share:g} s, "
                  f"resend {resend}: {sum(failures.values())} of {args.calls} calls failed {dict(failures)}",
                  flush=True)
    finally:
        server.should_exit = True
        thread.join(10)


if __name__ == "__main__":
    main()
