"""Background jobs: queued in Redis for `privface worker` (rq), or run in-process without Redis.

A job is a database row (kind, params, status, progress) plus a function from `JOB_KINDS`; the same
function runs in either executor, reporting progress through `JobReporter`.

Lifecycle: queued -> running -> succeeded | failed | cancelled. `cancel_job` cancels a queued job at once and
asks a running one of a cancellable kind to stop (status `cancelling`; the job sees `report.cancel_requested`
and ends `cancelled`). While a job runs, its executor refreshes the row's `updated_at` every third of
`job_lease_s` (the heartbeat). A running row whose heartbeat is older than the lease belongs to an executor that
died (worker killed, machine lost): `recover_orphaned_jobs` requeues it when its kind can resume (the
federated job continues after its last finished round) and fails it with a one-line reason otherwise. The rq
worker and the in-process runner both run that recovery periodically.
"""
from __future__ import annotations

import logging
import threading
import traceback
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.db import make_engine, make_sessionmaker, session_scope
from app.models import Job, utcnow
from app.problems import Problem
from app.services import federated_job
from app.settings import GatewaySettings, get_settings

log = logging.getLogger(__name__)
QUEUE_NAME = "privface"
# what a job raises for bad input (a path outside the model directory, a missing or inconsistent version)
INPUT_ERRORS = (ValueError, LookupError, FileNotFoundError)


TERMINAL = ("succeeded", "failed", "cancelled")
MAX_ATTEMPTS = 3  # a resumable job is restarted at most this many times in all (a job that kills its worker)


class JobCancelled(Exception):
    """Raised by a job function that stopped because it was asked to; `details` become the job's result."""

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.details = details


class JobReporter:
    """What a running job may do: report progress and a message, see whether it was asked to stop, and know
    which attempt it is (a resumed job is attempt 2 or more)."""

    def __init__(self, sessions: sessionmaker[Session], job_id: str, attempt: int = 1) -> None:
        self._sessions, self.job_id, self.attempt = sessions, job_id, attempt
        self.cancel_requested = threading.Event()

    def progress(self, fraction: float, message: str | None = None, details: dict[str, Any] | None = None) -> None:
        """`details` (e.g. a federated job's rounds) is shown as the job's result while it runs; the job's
        return value replaces it when it ends."""
        with session_scope(self._sessions) as session:
            job = session.get_one(Job, self.job_id)
            if job.status == "cancelling":  # seen now, not only at the next heartbeat (a job checks it after this)
                self.cancel_requested.set()
            job.progress = max(0.0, min(1.0, fraction))
            if message is not None:
                job.message = message
            if details is not None:
                job.result = {**details, "attempt": self.attempt}


def _export_model_v0(settings: GatewaySettings, sessions: sessionmaker[Session], params: dict[str, Any],
                     report: JobReporter) -> dict[str, Any]:
    from app.services.model_registry import register_model_dir
    from inference.model_v0 import ensure_model_v0

    report.progress(0.05, "exporting model v0 to ONNX")
    version_dir = ensure_model_v0(settings.model_dir, settings.shared_dir)
    report.progress(0.9, "registering")
    with session_scope(sessions) as session:
        row = register_model_dir(session, settings.model_dir, Path(version_dir))
        return {"version": row.version, "status": row.status, "sha256": row.sha256}


def _register_model(settings: GatewaySettings, sessions: sessionmaker[Session], params: dict[str, Any],
                    report: JobReporter) -> dict[str, Any]:
    from app.services.model_registry import register_model_dir

    if "path" not in params:
        raise ValueError("params.path (a model version directory under the model directory) is required")
    version_dir = (settings.model_dir / params["path"]).resolve()
    if settings.model_dir.resolve() not in version_dir.parents:
        raise ValueError("params.path must lie inside the model directory")
    with session_scope(sessions) as session:
        row = register_model_dir(session, settings.model_dir, version_dir)
        return {"version": row.version, "status": row.status, "sha256": row.sha256}


JobFunction = Callable[[GatewaySettings, sessionmaker[Session], dict[str, Any], JobReporter], dict[str, Any]]
JOB_KINDS: dict[str, JobFunction] = {
    "export-model-v0": _export_model_v0,
    "register-model": _register_model,
    "federated": federated_job.run_federated_job,  # runs .venv-federated as a subprocess
}
CANCELLABLE_KINDS = frozenset({"federated"})  # stop between rounds
RESUMABLE_KINDS = frozenset({"federated"})  # continue after the last finished round
# Kinds whose params are checked before the job is queued: params -> params with defaults, or a 422 Problem.
JOB_PARAM_VALIDATORS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "federated": federated_job.validate_params,
}


def validate_job_params(kind: str, params: dict[str, Any]) -> dict[str, Any]:
    """The params to store for a new job of `kind` (unchanged for kinds without a validator)."""
    validator = JOB_PARAM_VALIDATORS.get(kind)
    return validator(params) if validator is not None else params


def execute(job_id: str, settings: GatewaySettings | None = None) -> None:
    """Run one job to completion, recording its outcome. This is what the rq worker calls.

    A job that is no longer queued (cancelled before it started, or already taken) is left alone. The job is
    taken with a conditional update (queued -> running), so a cancel landing at the same moment either wins
    (the job never runs) or finds it running (it is asked to stop); never both."""
    settings = settings or get_settings()
    sessions = make_sessionmaker(make_engine(settings.database_url))
    with session_scope(sessions) as session:
        taken = cast("CursorResult[Any]", session.execute(update(Job).where(Job.id == job_id, Job.status == "queued")
                                                          .values(status="running")))
        job = session.get(Job, job_id)
        if job is None or taken.rowcount != 1:
            log.info("job %s is %s, not queued: not run", job_id, job.status if job else "unknown")
            return
        kind, params = job.kind, dict(job.params)
        attempt = int((job.result or {}).get("attempt", 1))
    reporter = JobReporter(sessions, job_id, attempt)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(sessions, job_id, reporter, settings.job_lease_s / 3, stop),
                            name=f"heartbeat-{job_id}", daemon=True)
    beat.start()
    try:
        result = JOB_KINDS[kind](settings, sessions, params, reporter)
    except JobCancelled as exc:
        _finish(sessions, job_id, "cancelled", str(exc), exc.details)
        return
    except INPUT_ERRORS as exc:  # the admin's input (a path, a model directory): one line, no traceback
        log.warning("job %s (%s) refused: %s: %s", job_id, kind, type(exc).__name__, exc)
        _finish(sessions, job_id, "failed", f"{type(exc).__name__}: {exc}", None)
        return
    except Exception as exc:  # a failed job is recorded, never lost; a fault of ours keeps its traceback
        log.error("job %s (%s) failed", job_id, kind, exc_info=True)
        _finish(sessions, job_id, "failed", f"{type(exc).__name__}: {exc}", None)
        return
    finally:
        stop.set()
        beat.join()
    _finish(sessions, job_id, "succeeded", "done", result)


def _heartbeat(sessions: sessionmaker[Session], job_id: str, reporter: JobReporter, period: float,
               stop: threading.Event) -> None:
    """Refresh the row's updated_at while the job runs (its lease), and pass a cancel request on to the job."""
    while not stop.wait(period):
        try:
            with session_scope(sessions) as session:
                session.execute(update(Job).where(Job.id == job_id, Job.status.in_(("running", "cancelling")))
                                .values(updated_at=utcnow()))
                status = session.execute(select(Job.status).where(Job.id == job_id)).scalar_one_or_none()
            if status == "cancelling":
                reporter.cancel_requested.set()
        except Exception:  # the database may be briefly unreachable; the next beat tries again
            log.warning("heartbeat of job %s failed: %s", job_id, traceback.format_exc(limit=1))


def _finish(sessions: sessionmaker[Session], job_id: str, status: str, message: str, result: dict[str, Any] | None) -> None:
    with session_scope(sessions) as session:
        job = session.get_one(Job, job_id)
        if status == "succeeded" and job.status == "cancelling":
            message = "done: the cancel request came after the job's last point where it could stop"
        job.status, job.message, job.result = status, message, result
        if status == "succeeded":
            job.progress = 1.0


def cancel_job(sessions: sessionmaker[Session], job_id: str) -> Job:
    """Cancel a queued job now, or ask a running job of a cancellable kind to stop (it ends `cancelled` after
    the step in progress). Refused with 409, changing nothing, for a finished job or a kind that cannot stop."""
    with session_scope(sessions) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise Problem(404, "job-not-found", "Unknown job", f"No job {job_id!r}.")
        if job.status == "queued":  # conditional: a worker taking the job at this moment makes it `running`
            stopped = cast("CursorResult[Any]", session.execute(
                update(Job).where(Job.id == job_id, Job.status == "queued")
                .values(status="cancelled", message="cancelled before it started")))
            session.refresh(job)
            if stopped.rowcount == 1:
                session.expunge(job)
                return job
        if job.status in TERMINAL:
            raise Problem(409, "job-finished", "The job has finished", f"Job {job_id} is already {job.status}.")
        if job.status == "running":
            if job.kind not in CANCELLABLE_KINDS:
                raise Problem(409, "job-not-cancellable", "This job cannot be cancelled while it runs",
                              f"A running {job.kind!r} job cannot stop half-way; cancellable while running: "
                              f"{sorted(CANCELLABLE_KINDS)}.")
            asked = cast("CursorResult[Any]", session.execute(
                update(Job).where(Job.id == job_id, Job.status == "running")
                .values(status="cancelling", message="cancel requested: stops after the step in progress")))
            session.refresh(job)
            if asked.rowcount != 1 and job.status in TERMINAL:  # it ended at this moment
                raise Problem(409, "job-finished", "The job has finished", f"Job {job_id} is already {job.status}.")
        session.flush()
        session.expunge(job)
        return job


def _as_utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def recover_orphaned_jobs(settings: GatewaySettings, sessions: sessionmaker[Session],
                          requeue: Callable[[str, int], None]) -> list[tuple[str, str]]:
    """Jobs whose executor died (no heartbeat for `job_lease_s`): requeue the resumable ones (`requeue(job_id,
    attempt)`), fail the rest with a clear message, finish the ones being cancelled. Returns (job id, new status).
    Each row is claimed with a conditional update, so several workers recovering at once act on it once."""
    lease = settings.job_lease_s
    cutoff = datetime.now(timezone.utc) - timedelta(seconds=lease)
    outcomes: list[tuple[str, str]] = []
    with session_scope(sessions) as session:
        rows = session.execute(select(Job.id, Job.kind, Job.status, Job.updated_at, Job.result)
                               .where(Job.status.in_(("running", "cancelling")))).all()
    for job_id, kind, status, seen, result in rows:
        if seen is None or _as_utc(seen) > cutoff:
            continue
        details = dict(result or {})
        attempt = int(details.get("attempt", 1))
        lost = f"the worker running it stopped (no heartbeat for {lease:g} s)"
        if status == "cancelling":
            new, message = "cancelled", f"cancelled: {lost} while it was being cancelled"
        elif kind in RESUMABLE_KINDS and attempt < MAX_ATTEMPTS:
            new, message = "queued", f"{lost}; resuming where it stopped (attempt {attempt + 1} of {MAX_ATTEMPTS})"
            details["attempt"] = attempt + 1
        elif kind in RESUMABLE_KINDS:
            new, message = "failed", f"WorkerLost: {lost}, for the {MAX_ATTEMPTS}th time; not retried again"
        else:
            new, message = "failed", f"WorkerLost: {lost}; a {kind!r} job cannot resume, start it again"
        with session_scope(sessions) as session:
            claimed = cast("CursorResult[Any]", session.execute(update(Job).where(Job.id == job_id, Job.status == status, Job.updated_at == seen)
                                      .values(status=new, message=message, result=details, updated_at=utcnow())))
        if claimed.rowcount != 1:
            continue  # another recoverer (or the job itself) got there first
        log.warning("job %s (%s): %s", job_id, kind, message)
        outcomes.append((job_id, new))
        if new == "queued":
            requeue(job_id, attempt + 1)
    return outcomes


class JobRunner:
    """Submits jobs to Redis (rq) when configured, else to an in-process thread; in-process, it also recovers
    the jobs a previous gateway process left running (see `recover_orphaned_jobs`)."""

    def __init__(self, settings: GatewaySettings, sessions: sessionmaker[Session], recover: bool | None = None) -> None:
        self._settings, self._sessions = settings, sessions
        self._queue = None
        self._pool: ThreadPoolExecutor | None = None
        self._stop = threading.Event()
        if settings.redis_url:
            import redis
            from rq import Queue

            self._queue = Queue(QUEUE_NAME, connection=redis.Redis.from_url(settings.redis_url))
        else:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="privface-job")
        if recover if recover is not None else self._pool is not None:
            threading.Thread(target=self._recover_forever, name="privface-job-recovery", daemon=True).start()

    @property
    def backend(self) -> str:
        return "rq" if self._queue is not None else "in-process"

    def submit(self, kind: str, params: dict[str, Any]) -> str:
        if kind not in JOB_KINDS:
            raise KeyError(kind)
        job_id = "job_" + uuid.uuid4().hex
        with session_scope(self._sessions) as session:
            session.add(Job(id=job_id, kind=kind, params=params))
        self._enqueue(job_id, 1)
        return job_id

    def _enqueue(self, job_id: str, attempt: int) -> None:
        if self._queue is not None:  # rq job ids are unique: the dead attempt's may still be in a registry
            rq_id = job_id if attempt == 1 else f"{job_id}-attempt{attempt}"
            self._queue.enqueue(execute, job_id, job_id=rq_id, job_timeout=6 * 3600)
        elif self._pool is not None:  # the constructor set one of the two
            self._pool.submit(execute, job_id, self._settings)

    def recover(self) -> list[tuple[str, str]]:
        return recover_orphaned_jobs(self._settings, self._sessions, self._enqueue)

    def _recover_forever(self) -> None:
        while not self._stop.wait(self._settings.job_lease_s / 2):
            try:
                self.recover()
            except Exception:
                log.warning("job recovery failed: %s", traceback.format_exc(limit=1))

    def shutdown(self) -> None:
        self._stop.set()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def run_worker(settings: GatewaySettings) -> None:
    """`privface worker`: an rq worker on the privface queue."""
    import redis

    from app.services.rq_worker import PromptStopWorker

    if not settings.redis_url:
        raise SystemExit("error: PRIVFACE_REDIS_URL is not set; without Redis, jobs run inside the gateway")
    connection = redis.Redis.from_url(settings.redis_url)
    JobRunner(settings, make_sessionmaker(make_engine(settings.database_url)), recover=True)  # requeues orphans
    PromptStopWorker([QUEUE_NAME], connection=connection).work(with_scheduler=False)
