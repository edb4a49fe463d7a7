"""Merge concurrent identify requests of one gateway worker into one MPC job.

An MPC identify job pays fixed costs (communication rounds, the knockout tournament over the gallery) that a
batch of Q queries shares, so under load it is cheaper to run one job for all queries that want the same
search. Requests are merged only when everything that defines the search is equal — the gallery, the
snapshot (upto, committed count) and the threshold — so each caller gets exactly the answer its own job
would have given. The first request of a key opens a short window (``wait_ms``); the batch runs when the
window ends or it holds ``max_batch`` queries. Every caller gets its own result, or the batch's exception.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field

import numpy as np

from app.metrics import IDENTIFY_BATCH
from common.logs import current_request_id
from common.settings import MAX_QUERY_BATCH
from secure.coordinator import PartyPair
from secure.thresholds import GalleryPolicy

log = logging.getLogger(__name__)

BatchKey = tuple[str, int, int, GalleryPolicy]  # (gallery, upto, committed, the gallery's thresholds)


@dataclass
class _Batch:
    queries: list[np.ndarray] = field(default_factory=list)
    waiters: list[asyncio.Future[int | None]] = field(default_factory=list)
    request_ids: list[str] = field(default_factory=list)  # logged with the job: one job serves them all
    full: asyncio.Event = field(default_factory=asyncio.Event)


class IdentifyBatcher:
    """Per gateway process (one event loop). ``wait_ms <= 0`` or ``max_batch <= 1``: no batching."""

    def __init__(self, parties: PartyPair, wait_ms: float, max_batch: int) -> None:
        self.parties = parties
        self.wait_s = max(0.0, float(wait_ms)) / 1000.0
        self.max_batch = max(1, min(int(max_batch), MAX_QUERY_BATCH))
        self._open: dict[BatchKey, _Batch] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # keep running batches referenced until they finish

    @property
    def enabled(self) -> bool:
        return self.wait_s > 0 and self.max_batch > 1

    async def identify(self, gallery: str, upto: int, committed: int, threshold: GalleryPolicy,
                       query: np.ndarray) -> int | None:
        """The matched template_seq for ``query`` on this snapshot, or None (as ``PartyPair.identify``)."""
        if not self.enabled:
            return await self.parties.identify(uuid.uuid4().hex, gallery, upto, query, threshold,
                                               expected_committed=committed)
        key: BatchKey = (gallery, int(upto), int(committed), threshold)
        batch = self._open.get(key)
        if batch is None:
            batch = self._open[key] = _Batch()
            task = asyncio.create_task(self._run(key, batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        waiter: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        batch.queries.append(query)
        batch.waiters.append(waiter)
        batch.request_ids.append(current_request_id() or "-")
        if len(batch.queries) >= self.max_batch:
            self._close(key, batch)
        return await waiter

    def _close(self, key: BatchKey, batch: _Batch) -> None:
        """No more queries join this batch; it runs now."""
        if self._open.get(key) is batch:
            del self._open[key]
        batch.full.set()

    async def _run(self, key: BatchKey, batch: _Batch) -> None:
        try:
            try:
                await asyncio.wait_for(batch.full.wait(), self.wait_s)
            except asyncio.TimeoutError:
                pass
            self._close(key, batch)
            gallery, upto, committed, threshold = key
            IDENTIFY_BATCH.observe(len(batch.queries))
            if len(batch.queries) == 1:  # alone: the plain single-query job
                results = [await self.parties.identify(uuid.uuid4().hex, gallery, upto, batch.queries[0],
                                                       threshold, expected_committed=committed)]
            else:
                job_id = uuid.uuid4().hex  # the parties log it with the first request's id (this task's)
                log.info("identify job %s batches %d requests: %s", job_id, len(batch.queries),
                         ",".join(batch.request_ids))
                results = await self.parties.identify_many(job_id, gallery, upto, batch.queries,
                                                           threshold, expected_committed=committed)
        except Exception as exc:  # noqa: BLE001 - every caller of the batch gets the batch's failure
            for waiter in batch.waiters:
                if not waiter.done():
                    waiter.set_exception(exc)
            return
        except BaseException:  # cancelled (shutdown): so are the callers still waiting
            self._close(key, batch)
            for waiter in batch.waiters:
                waiter.cancel()
            raise
        finally:
            batch.queries.clear()  # drop the protected templates as soon as the job is over
        for waiter, result in zip(batch.waiters, results):
            if not waiter.done():  # a caller that went away (cancelled) has no result to take
                waiter.set_result(result)
