"""Gallery sharding across several engine pairs, with a merge that opens only the final output.

With ``PRIVFACE_MPC_SHARDS=K`` each party runs K ``MpcEngine``s (shard k rendezvous-es with the peer party's
shard k and its own dealer on ``master_port + k``, possibly on another host: ``PRIVFACE_MPC_SHARD_ADDRS``).
A 1:N job is split by label (row label % K, so a template stays on its shard as the gallery grows):

1. every non-empty shard runs an "identify-best" job on its rows, in parallel: the knockout winner of each
   query, kept as additive shares (score at scale 2^32, label), no threshold, nothing opened;
2. shard 0 runs a "merge" job on those K candidates: one more knockout, then [best >= T] * label.

Each party only ever moves its OWN shares between its own engines (party 0's shard engines all belong to
party 0), so the merge reveals nothing beyond the usual output. Ties: within a shard the lower row wins, across
shards the lower shard. Verify jobs (a handful of rows) run on shard 0 unchanged.
"""
from __future__ import annotations

import threading
import time
from typing import Any, cast

import numpy as np

from secure.mpc.engine import MatchJob, MpcEngine, MpcUnavailable
from secure.mpc.protocols.base import Output
from secure.mpc.settings import MpcSettings

Shard = tuple[int, np.ndarray, np.ndarray]  # (shard index, this party's share rows, their labels)


def shard_of(labels: np.ndarray, shards: int) -> np.ndarray:
    """Shard index of each row (labels are positive template sequence numbers)."""
    return np.asarray(labels, dtype=np.int64) % shards


class ShardedEngine:
    """K engine pairs behind the ``MpcEngine`` interface (start, stop, status, submit, wait_connected, job_stats)."""

    def __init__(self, rank: int, settings: MpcSettings) -> None:
        self.rank = rank
        self.settings = settings
        self.engines = [MpcEngine(rank, s) for s in settings.shard_settings()]
        self._lock = threading.Lock()
        self._last_split: tuple[str | None, list[Shard]] | None = None  # (gallery_id, parts) of the last named snapshot

    def start(self) -> None:
        for e in self.engines:
            e.start()

    def stop(self) -> None:
        for e in self.engines:
            e.stop()

    def status(self) -> dict[str, Any]:
        shards = [e.status() for e in self.engines]
        return {"connected": all(s["connected"] for s in shards), "generation": shards[0]["generation"],
                "provider": self.settings.provider, "shards": shards,
                "last_error": next((s["last_error"] for s in shards if s["last_error"]), None)}

    def forget_rows(self) -> None:
        """Erasure after a committed delete, in every shard's engine (``MpcEngine.forget_rows``)."""
        for engine in self.engines:
            engine.forget_rows()

    def job_stats(self, job_id: str) -> dict[str, Any] | None:
        """This party's traffic for a job: bytes summed over the shard jobs and the merge, rounds = the slowest
        shard's plus the merge's (shards run in parallel); per-shard stats under "shards"."""
        merge = self.engines[0].job_stats(f"{job_id}.merge")
        if merge is None:
            return self.engines[0].job_stats(job_id)
        found = [e.job_stats(f"{job_id}.s{k}") for k, e in enumerate(self.engines)]
        parts = [p for p in found if p]
        out = dict(merge)
        out.update(bytes=sum(int(p["bytes"]) for p in parts) + int(merge["bytes"]),
                   rounds=max((int(p["rounds"]) for p in parts), default=0) + int(merge["rounds"]),
                   setup_rows=sum(int(p.get("setup_rows", 0)) for p in parts),
                   mpc_s=max((float(p["mpc_s"]) for p in parts), default=0.0) + float(merge["mpc_s"]),
                   coalesced=max((int(p.get("coalesced", 1)) for p in parts), default=1),
                   merge=merge, shards=parts)
        return out

    def wait_connected(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        return all(e.wait_connected(max(0.0, deadline - time.monotonic())) for e in self.engines)

    def submit(self, job: MatchJob, timeout: float) -> Output:
        if job.kind != "identify" or len(self.engines) == 1 or job.sealed is not None:
            return self.engines[0].submit(job, timeout)  # a sealed query exists only inside its job: not split
        deadline = time.monotonic() + timeout
        parts = self._split(job)
        if not parts:
            return self.engines[0].submit(job, timeout)  # empty gallery: the engine answers 0 without MPC
        batch = job.query_share.ndim == 2
        shard_jobs = [(k, MatchJob(job_id=f"{job.job_id}.s{k}", kind="identify-best", query_share=job.query_share,
                                   gallery_share=rows, labels=labels, threshold=job.threshold,
                                   gallery_id=f"{job.gallery_id}.s{k}" if job.gallery_id else None))
                      for k, rows, labels in parts]
        winners = self._run_shard_jobs(shard_jobs, deadline)
        q = int(job.query_share.shape[0]) if batch else 1
        merge = MatchJob(job_id=f"{job.job_id}.merge", kind="merge", query_share=np.zeros(q, dtype=np.int64),
                         gallery_share=np.stack(winners).reshape(len(parts), 2 * q),
                         labels=np.arange(1, len(parts) + 1, dtype=np.int64), threshold=job.threshold)
        out = self.engines[0].submit(merge, max(0.0, deadline - time.monotonic()))
        if not isinstance(out, list):
            raise MpcUnavailable("the merge job answered no list of shares")
        flat = cast(list[int], out)
        return list(flat) if batch else int(flat[0])


    def _split(self, job: MatchJob) -> list[Shard]:
        """(shard, share rows, labels) of each non-empty shard. A named snapshot (``gallery_id``) is split once
        and reused: copying a 100k-row gallery into its shards costs ~30 ms per query."""
        cached = self._last_split
        if cached is not None and job.gallery_id is not None and cached[0] == job.gallery_id:
            return cached[1]
        where = shard_of(job.labels, len(self.engines))
        parts: list[Shard] = []
        for k in range(len(self.engines)):
            rows = np.flatnonzero(where == k)
            if rows.size:
                parts.append((k, job.gallery_share[rows], job.labels[rows]))
        with self._lock:
            self._last_split = (job.gallery_id, parts) if job.gallery_id is not None else None
        return parts

    def _run_shard_jobs(self, shard_jobs: list[tuple[int, MatchJob]], deadline: float) -> list[np.ndarray]:
        """Submit every shard's job at once, one thread each, and wait for all. Not a bounded pool: with
        concurrent queries a pool would queue shard jobs in an order that differs between the parties, and a
        party 0 announcing a job party 1 has not submitted yet ends in "skipped by both"."""
        results: list[Any] = [None] * len(shard_jobs)
        errors: list[BaseException] = []

        def run(i: int, k: int, shard_job: MatchJob) -> None:
            try:
                results[i] = self.engines[k].submit(shard_job, max(0.0, deadline - time.monotonic()))
            except BaseException as exc:  # noqa: BLE001 - reported to the caller below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i, k, sj), daemon=True, name=f"mpc-shard-{self.rank}-{k}")
                   for i, (k, sj) in enumerate(shard_jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()) + 1.0)
        if errors:
            err = errors[0]
            raise err if isinstance(err, MpcUnavailable) else MpcUnavailable(f"shard job failed ({type(err).__name__})")
        if any(t.is_alive() for t in threads) or any(r is None for r in results):
            raise MpcUnavailable("shard job not answered in time")
        return [np.asarray(r, dtype=np.int64) for r in results]


def make_engine(rank: int, settings: MpcSettings) -> MpcEngine | ShardedEngine:
    """The party's engine: one pair, or K shard pairs when ``settings.shards > 1``."""
    return ShardedEngine(rank, settings) if settings.shards > 1 else MpcEngine(rank, settings)


def run_dealers(settings: MpcSettings, stop_event: threading.Event | None = None) -> None:
    """The dealer of every shard in this process (one supervisor thread each); blocks like ``run_dealer``."""
    from secure.mpc.dealer.supervisor import run_dealer

    if settings.shards == 1:
        run_dealer(settings, stop_event)
        return
    stop = stop_event or threading.Event()
    threads = [threading.Thread(target=run_dealer, args=(s, stop), name=f"dealer-shard-{k}", daemon=True)
               for k, s in enumerate(settings.shard_settings())]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
