"""The gateway's admission control for MPC jobs: ``JobPacer.slot()`` around every job sent to the parties.

Why: each party runs MPC jobs one after another (``secure/mpc/engine.py``) and spends one token of its per-link
budget on each (``secure/party/ratelimit.py``). Under 16 concurrent clients with a gallery of 1,000 the gateway
offered more jobs than the parties could compute: jobs waited in the parties' queues past the gateway's deadline
(503) or found the budget empty (429) — 6-17% of requests in the issue-13 load test (docs/operations.md).
The pacer keeps at most ``concurrency`` jobs in flight per gateway process and starts at most ``rate_per_s``
per second (burst ``burst``), a little under the party's budget; a request over that waits here, in order,
instead of failing at the party. A request that would wait longer than ``max_wait_s`` is refused at once
(``PartiesUnavailable``: the caller's 503 with Retry-After), so the queue never outgrows the deadline.

Nothing here depends on a job's content or result: pacing changes when a job is sent, never what is sent.
The party's own budget stays the guard against a gateway that does not pace (a compromised one, a second one).
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from secure.party.ratelimit import TokenBucket
from secure.party.replies import PartiesUnavailable


class JobPacer:
    def __init__(self, concurrency: int, rate_per_s: float, burst: int, max_wait_s: float) -> None:
        if concurrency < 1 or max_wait_s <= 0:
            raise ValueError("concurrency must be at least 1 and max_wait_s positive")
        self.concurrency, self.max_wait_s = int(concurrency), float(max_wait_s)
        self._bucket = TokenBucket(rate_per_s, burst)
        self._loop: asyncio.AbstractEventLoop | None = None  # the asyncio primitives belong to one loop
        self._slots = asyncio.Semaphore(self.concurrency)
        self._rate_lock = asyncio.Lock()  # token waiters in arrival order, so a late one cannot overtake
        self.waited_s = 0.0  # total time jobs spent waiting here (metrics, tests)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one in-flight slot and one rate token for the duration of a job, or raise ``PartiesUnavailable``
        if neither comes within ``max_wait_s``."""
        self._bind_to_running_loop()
        start = time.monotonic()
        deadline = start + self.max_wait_s
        try:
            await asyncio.wait_for(self._slots.acquire(), timeout=self.max_wait_s)
        except TimeoutError:
            raise PartiesUnavailable(self._busy("in-flight MPC jobs"), status=503) from None
        try:
            await self._take_token(deadline)
            self.waited_s += time.monotonic() - start
            yield
        finally:
            self._slots.release()

    def _bind_to_running_loop(self) -> None:
        """A process serves from one loop; tests that start several (one per TestClient) get fresh primitives."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop = loop
            self._slots, self._rate_lock = asyncio.Semaphore(self.concurrency), asyncio.Lock()

    async def _take_token(self, deadline: float) -> None:
        async with self._rate_lock:
            while (wait := self._bucket.take()) > 0:
                if time.monotonic() + wait > deadline:
                    raise PartiesUnavailable(self._busy("match jobs per second"), status=503)
                await asyncio.sleep(wait)

    def _busy(self, what: str) -> str:
        return f"the gateway's queue for the parties is full (its limit of {what}); retry shortly"
