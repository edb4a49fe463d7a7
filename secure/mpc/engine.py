"""The party-side MPC engine: ``MpcEngine.submit(MatchJob, timeout) -> this party's share of the output``.

Lifecycle. ``start()`` runs a supervisor thread. Each *generation* is one worker process (``worker.party_main``,
forked from a fork server with torch and CrypTen loaded: ``runtime/warm.py``) that rendezvous-es with the peer party and the dealer (torch.distributed gloo, CrypTen
TTP), reports "up", then serves jobs until anything fails: a peer or the dealer dies (connection closed) or
goes silent (gloo timeout = op_timeout_s; idle links carry heartbeats), or the rendezvous times out. The
worker then exits; the supervisor fails every pending job with ``MpcUnavailable``, waits retry_backoff_s and
starts the next generation — forever, until ``stop()``. A broken gloo group is never reused, and a worker
dies with its supervisor, so killing a party process releases its sockets at once.

Ordering. Party 0 leads: its worker runs locally submitted jobs oldest first and announces each to party 1,
which waits up to pair_wait_s for the same job id from its own caller; both run it, or both skip it (then the
submit raises ``MpcUnavailable``). ``submit`` raises ``MpcUnavailable`` when the engine is not connected, when
the job is skipped, when the generation breaks during the job, or when it has not finished within ``timeout``.

This module imports neither torch nor CrypTen (only the workers do).
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from secure.mpc.protocols.base import JobKind, Output
from secure.mpc.protocols.sealed_model import SealedQuery
from secure.mpc.runtime.messages import (
    CancelJob,
    Down,
    ForgetRows,
    FromWorker,
    JobDone,
    JobFailed,
    RunJob,
    Stop,
    Up,
    WorkerJob,
)
from secure.mpc.runtime.warm import worker_context
from secure.mpc.settings import MpcSettings
from secure.ranges import check_threshold

log = logging.getLogger("privface.mpc")


@dataclass(frozen=True)
class MatchJob:
    job_id: str                 # same string at both parties (gateway-assigned uuid4 hex)
    kind: JobKind
    query_share: np.ndarray     # int64 [d]: this party's additive share of the fixed-point query (16 frac bits);
    #                             identify also takes a batch [Q, d] of queries (one MPC run; submit -> list)
    gallery_share: np.ndarray   # int64 [n, d]: this party's shares of the candidate templates, same order at both
    labels: np.ndarray          # int64 [n], public, positive, identical at both parties
    threshold: float            # public cosine threshold
    # Sharding (``sharding.py``; dealer-bits only): "identify-best" answers the knockout winner without the
    # threshold, [2Q] shares (Q scores at scale 2^32, then Q labels). "merge" takes gallery_share = int64 [K, 2Q],
    # each row one shard's winner shares, query_share = zeros [Q], labels = 1..K, and answers like identify ([Q]).
    gallery_id: str | None = None  # optional: equal ids promise equal gallery_share AND labels (skips comparing)
    # Sealed mode (issue 12): the query is computed under MPC from this party's share of the SDK's features
    # (``protocols/sealed_model.SealedQuery``); query_share is then zeros [d], a placeholder of the right size.
    # "embed" (sealed enrollment) takes gallery_share int64 [0, d] and answers this party's template share [d].
    sealed: SealedQuery | None = None


class MpcUnavailable(Exception):
    """Peer/dealer down, not connected, job skipped, or timed out: the party answers 503."""


class _Pending:
    __slots__ = ("event", "share", "error")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.share: Output | None = None
        self.error: str | None = None

    def finish(self, share: Output | None = None, error: str | None = None) -> None:
        self.share, self.error = share, error
        self.event.set()


def _validate(job: MatchJob) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if job.kind not in ("verify", "identify", "identify-best", "merge", "embed"):
        raise ValueError(f"unknown job kind {job.kind!r}")
    if job.sealed is not None or job.kind == "embed":
        _validate_sealed(job)
    if job.kind == "merge":
        return _validate_merge(job)
    if not isinstance(job.job_id, str) or not job.job_id or len(job.job_id) > 200:
        raise ValueError("job_id must be a non-empty string")
    q = np.ascontiguousarray(job.query_share)
    g = np.ascontiguousarray(job.gallery_share)
    lab = np.ascontiguousarray(job.labels)
    for name, arr in (("query_share", q), ("gallery_share", g), ("labels", lab)):
        if arr.dtype != np.int64:
            raise ValueError(f"{name} must be int64, got {arr.dtype}")
    if q.ndim == 2 and job.kind in ("identify", "identify-best"):
        if not 1 <= q.shape[0] <= 4096:
            raise ValueError("a query batch holds 1 to 4096 queries")
    elif q.ndim != 1:
        raise ValueError("expected query_share [d] (identify: [d] or [Q, d])")
    if g.ndim != 2 or lab.ndim != 1:
        raise ValueError("expected query_share [d], gallery_share [n, d], labels [n]")
    if g.shape[0] and g.shape[1] != q.shape[-1]:
        raise ValueError(f"gallery rows have d={g.shape[1]}, query has d={q.shape[-1]}")
    if lab.shape[0] != g.shape[0]:
        raise ValueError("labels and gallery rows differ in number")
    check_threshold(job.threshold)  # finite and in [-1, 1]: the comparison wraps beyond ~31
    return q, g, lab


def _validate_sealed(job: MatchJob) -> None:
    """A sealed job: one image's feature share, a square rotation of the query's size (one query, not a batch)."""
    sealed = job.sealed
    if sealed is None or job.kind not in ("embed", "verify", "identify"):
        raise ValueError("sealed input goes with embed, verify and identify jobs, and an embed job needs it")
    features, rotation = np.asarray(sealed.features), np.asarray(sealed.rotation)
    if features.dtype != np.int64 or features.ndim != 4 or features.shape[0] != 1:
        raise ValueError("sealed features must be one int64 share [1, K, H, W]")
    if np.ndim(job.query_share) != 1 or rotation.ndim != 2 or rotation.shape != (job.query_share.shape[-1],) * 2:
        raise ValueError("the rotation must be [d, d] for a query of size d")
    if job.kind == "embed" and np.asarray(job.gallery_share).shape[0] != 0:
        raise ValueError("an embed job has no gallery")


def _validate_merge(job: MatchJob) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    q = np.ascontiguousarray(job.query_share)
    g = np.ascontiguousarray(job.gallery_share)
    lab = np.ascontiguousarray(job.labels)
    if q.dtype != np.int64 or g.dtype != np.int64 or lab.dtype != np.int64:
        raise ValueError("merge arrays must be int64")
    if q.ndim != 1 or g.ndim != 2 or g.shape[0] < 1 or g.shape[1] != 2 * q.shape[0] or lab.shape != (g.shape[0],):
        raise ValueError("merge expects query_share [Q], gallery_share [K, 2Q] (K >= 1), labels [K]")
    check_threshold(job.threshold)  # finite and in [-1, 1]: the comparison wraps beyond ~31
    return q, g, lab


def _close_queue(q: Any) -> None:
    if q is None:
        return
    try:
        q.cancel_join_thread()
        q.close()
    except Exception:  # noqa: BLE001
        pass


class MpcEngine:
    """One party's MPC engine (rank 0 = leader, rank 1 = follower). Thread-safe ``submit``."""

    def __init__(self, rank: int, settings: MpcSettings) -> None:
        if rank not in (0, 1):
            raise ValueError("rank must be 0 or 1")
        self.rank = rank
        self.settings = settings
        self._ctx = worker_context()
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self._inq: Any = None
        self._proc: Any = None
        self._connected = False
        self._generation = 0
        self._device: str | None = None
        self._last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stats: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        # the gallery snapshot the current worker already holds: an identical snapshot is not sent again
        self._send_lock = threading.Lock()
        self._last_gallery: np.ndarray | None = None
        self._last_labels: np.ndarray | None = None
        self._last_gallery_inq: Any = None
        self._last_gallery_id: str | None = None

    # ------------------------------------------------------------------------------------------ public
    def start(self) -> None:
        """Start the supervisor (non-blocking): rendezvous in the background, reconnect forever on failure."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._supervise, name=f"mpc-engine-{self.rank}", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the supervisor and the current worker; pending jobs fail with MpcUnavailable."""
        self._stop.set()
        with self._lock:
            inq, proc = self._inq, self._proc
        if inq is not None:
            try:
                inq.put(Stop())
            except Exception:  # noqa: BLE001
                pass
        if proc is not None:
            proc.join(1.0)
            if proc.is_alive():
                proc.kill()
        if self._thread is not None:
            self._thread.join(5.0)

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"connected": self._connected, "generation": self._generation,
                    "provider": self.settings.provider, "last_error": self._last_error}

    def forget_rows(self) -> None:
        """Erasure after a committed delete: drop every copy of gallery rows this engine and its worker keep
        between jobs (the resident snapshot here and in the worker, the fixed-gallery mask cache). The next
        identify job sends its snapshot in full and re-masks its rows with fresh masks in fresh slots."""
        with self._send_lock:
            self._last_gallery = self._last_labels = None
            self._last_gallery_id = None
            with self._lock:
                inq = self._inq if self._connected else None
            if inq is not None:
                inq.put(ForgetRows())

    def job_stats(self, job_id: str) -> dict[str, Any] | None:
        """Traffic/timing of a finished job at this party (bytes, rounds, comm_s, mpc_s, protocol), if known."""
        with self._lock:
            return self._stats.get(job_id)

    def wait_connected(self, timeout: float) -> bool:
        """Convenience for tests and start-up scripts: block until connected (True) or ``timeout`` (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.status()["connected"]:
                return True
            time.sleep(0.05)
        return bool(self.status()["connected"])

    def submit(self, job: MatchJob, timeout: float) -> Output:
        """Run ``job`` jointly with the peer party; block; return THIS party's int64 share of the output
        (a list of Q shares for a batch of Q queries)."""
        q, g, lab = _validate(job)
        if g.shape[0] == 0 and job.kind != "embed":
            return 0 if q.ndim == 1 else [0] * int(q.shape[0])
        pending = _Pending()
        with self._lock:
            if not self._connected or self._inq is None:
                raise MpcUnavailable(f"MPC engine not connected ({self._last_error or 'connecting'})")
            if job.job_id in self._pending:
                raise MpcUnavailable(f"job {job.job_id} is already pending")
            self._pending[job.job_id] = pending
            inq = self._inq
        try:
            with self._send_lock:  # decide "same gallery" and enqueue atomically: the worker resolves in queue order
                inq.put(RunJob(self._worker_job(job, q, g, lab, inq)))
        except Exception as exc:  # noqa: BLE001 - queue closed: generation just ended
            with self._lock:
                self._pending.pop(job.job_id, None)
            raise MpcUnavailable(f"MPC engine not connected ({exc})") from None
        if not pending.event.wait(max(0.0, float(timeout))):
            with self._lock:
                self._pending.pop(job.job_id, None)
            try:
                inq.put(CancelJob(job.job_id))
            except Exception:  # noqa: BLE001
                pass
            if pending.event.is_set() and pending.error is None and pending.share is not None:
                return pending.share  # finished in the race window
            raise MpcUnavailable(f"job not run within {timeout:g}s")
        if pending.error is not None or pending.share is None:
            raise MpcUnavailable(pending.error or "the worker answered no share")
        self._log_done(job, int(g.shape[0]))
        return pending.share

    def _log_done(self, job: MatchJob, rows: int) -> None:
        """The job's log line, in the caller's thread so that it carries the caller's request id (common/logs.py)."""
        stats = self.job_stats(job.job_id) or {}
        log.info("mpc job %s (%s, %d rows): %s rounds, %s bytes, %.3f s", job.job_id, job.kind, rows,
                 stats.get("rounds", "?"), stats.get("bytes", "?"), float(stats.get("mpc_s", float("nan"))))

    def _worker_job(self, job: MatchJob, q: np.ndarray, g: np.ndarray, lab: np.ndarray, inq: Any) -> WorkerJob:
        """The job as queued for the worker. A snapshot (rows and labels) already resident in the worker is not
        sent again: a small message also lets concurrent jobs reach the worker's queue at once (coalescing). A merge
        (tiny, never resident) leaves the resident snapshot alone. Call under ``_send_lock``."""
        base = WorkerJob(job_id=job.job_id, kind=job.kind, query=q, gallery=None, labels=None,
                         threshold=float(job.threshold), sealed=job.sealed)
        if job.kind in ("merge", "embed"):
            return replace(base, gallery=g, labels=lab)
        last = self._last_gallery
        if (last is not None and self._last_gallery_inq is inq and last.shape == g.shape
                and ((job.gallery_id is not None and job.gallery_id == self._last_gallery_id)
                     or (np.array_equal(last, g) and self._last_labels is not None
                         and np.array_equal(self._last_labels, lab)))):
            return base
        g = np.array(g, copy=True)
        self._last_gallery, self._last_labels, self._last_gallery_inq = g, lab, inq
        self._last_gallery_id = job.gallery_id
        return replace(base, gallery=g, labels=lab)

    # ------------------------------------------------------------------------------------------ supervisor
    def _supervise(self) -> None:
        from secure.mpc.runtime import worker

        settings_data = self.settings.model_dump()
        while not self._stop.is_set():
            with self._lock:
                self._generation += 1
                generation = self._generation
            inq, outq = self._ctx.Queue(), self._ctx.Queue()
            proc = self._ctx.Process(target=worker.party_main, name=f"privface-mpc-{self.rank}-g{generation}",
                                     args=(self.rank, settings_data, generation, inq, outq), daemon=True)
            try:
                proc.start()
            except Exception as exc:  # noqa: BLE001
                self._set_error(f"cannot start worker: {exc}")
                _close_queue(inq)
                _close_queue(outq)
                self._stop.wait(max(1.0, self.settings.retry_backoff_s))
                continue
            with self._lock:
                self._proc, self._inq = proc, inq
            try:
                self._pump(proc, outq)
            finally:
                with self._lock:
                    self._connected = False
                    self._inq = None
                    self._proc = None
                    orphans, self._pending = self._pending, {}
                reason = self._last_error or "MPC session ended"
                for p in orphans.values():
                    p.finish(error=f"MPC session lost: {reason}")
                if proc.is_alive():
                    proc.kill()
                proc.join(2.0)
                _close_queue(inq)
                _close_queue(outq)
            log.info("mpc rank %d generation %d ended: %s", self.rank, generation, self._last_error)
            self._stop.wait(self.settings.retry_backoff_s)

    def _pump(self, proc: Any, outq: Any) -> None:
        dead_since: float | None = None
        while True:
            try:
                msg = outq.get(timeout=0.1)
            except queue.Empty:
                if self._stop.is_set():
                    return
                if not proc.is_alive():
                    if dead_since is None:
                        dead_since = time.monotonic()
                    elif time.monotonic() - dead_since > 0.3:  # drained what it flushed
                        if proc.exitcode not in (0, 3):
                            self._set_error(f"worker exited with code {proc.exitcode}")
                        return
                continue
            except (EOFError, OSError):
                return
            self._handle(msg)

    def _handle(self, msg: FromWorker) -> None:
        if isinstance(msg, Up):
            with self._lock:
                self._connected = True
                self._device = msg.device
                self._last_error = None
            log.info("mpc rank %d generation %d connected (device %s)", self.rank, msg.generation, msg.device)
        elif isinstance(msg, JobDone):
            with self._lock:
                pending = self._pending.pop(msg.job_id, None)
                if pending is not None:
                    self._stats[msg.job_id] = msg.stats
                    while len(self._stats) > 256:
                        self._stats.popitem(last=False)
            if pending is not None:
                pending.finish(share=msg.share)
        elif isinstance(msg, JobFailed):
            with self._lock:
                pending = self._pending.pop(msg.job_id, None)
            if pending is not None:
                pending.finish(error=msg.reason)
        elif isinstance(msg, Down):
            with self._lock:
                self._connected = False
            self._set_error(msg.reason)

    def _set_error(self, text: str) -> None:
        with self._lock:
            self._last_error = text
