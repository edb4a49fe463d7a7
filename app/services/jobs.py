"""Background jobs: queued in Redis for `privface worker` (rq), or run in-process without Redis.

A job is a database row (kind, params, status, progress) plus a function from `JOB_KINDS`; the same
function runs in either executor, reporting progress through `JobReporter`.
"""
from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from app.db import make_engine, make_sessionmaker, session_scope
from app.models import Job
from app.services import federated_job
from app.settings import GatewaySettings, get_settings

log = logging.getLogger(__name__)
QUEUE_NAME = "privface"
# what a job raises for bad input (a path outside the model directory, a missing or inconsistent version)
INPUT_ERRORS = (ValueError, LookupError, FileNotFoundError)


class JobReporter:
    """What a running job may do: report progress and a message."""

    def __init__(self, sessions: sessionmaker[Session], job_id: str) -> None:
        self._sessions, self.job_id = sessions, job_id

    def progress(self, fraction: float, message: str | None = None, details: dict | None = None) -> None:
        """`details` (e.g. a federated job's rounds) is shown as the job's result while it runs; the job's
        return value replaces it when it ends."""
        with session_scope(self._sessions) as session:
            job = session.get(Job, self.job_id)
            job.progress = max(0.0, min(1.0, fraction))
            if message is not None:
                job.message = message
            if details is not None:
                job.result = details


def _export_model_v0(settings: GatewaySettings, sessions: sessionmaker[Session], params: dict,
                     report: JobReporter) -> dict:
    from app.services.model_registry import register_model_dir
    from inference.export import ensure_model_v0

    report.progress(0.05, "exporting model v0 to ONNX")
    version_dir = ensure_model_v0(settings.model_dir, settings.shared_dir)
    report.progress(0.9, "registering")
    with session_scope(sessions) as session:
        row = register_model_dir(session, settings.model_dir, Path(version_dir))
        return {"version": row.version, "status": row.status, "sha256": row.sha256}


def _register_model(settings: GatewaySettings, sessions: sessionmaker[Session], params: dict,
                    report: JobReporter) -> dict:
    from app.services.model_registry import register_model_dir

    if "path" not in params:
        raise ValueError("params.path (a model version directory under the model directory) is required")
    version_dir = (settings.model_dir / params["path"]).resolve()
    if settings.model_dir.resolve() not in version_dir.parents:
        raise ValueError("params.path must lie inside the model directory")
    with session_scope(sessions) as session:
        row = register_model_dir(session, settings.model_dir, version_dir)
        return {"version": row.version, "status": row.status, "sha256": row.sha256}


JobFunction = Callable[[GatewaySettings, sessionmaker[Session], dict, JobReporter], dict]
JOB_KINDS: dict[str, JobFunction] = {
    "export-model-v0": _export_model_v0,
    "register-model": _register_model,
    "federated": federated_job.run_federated_job,  # runs .venv-federated as a subprocess
}
# Kinds whose params are checked before the job is queued: params -> params with defaults, or a 422 Problem.
JOB_PARAM_VALIDATORS: dict[str, Callable[[dict], dict]] = {
    "federated": federated_job.validate_params,
}


def validate_job_params(kind: str, params: dict) -> dict:
    """The params to store for a new job of `kind` (unchanged for kinds without a validator)."""
    validator = JOB_PARAM_VALIDATORS.get(kind)
    return validator(params) if validator is not None else params


def execute(job_id: str, settings: GatewaySettings | None = None) -> None:
    """Run one job to completion, recording its outcome. This is what the rq worker calls."""
    settings = settings or get_settings()
    sessions = make_sessionmaker(make_engine(settings.database_url))
    with session_scope(sessions) as session:
        job = session.get(Job, job_id)
        kind, params = job.kind, dict(job.params)
        job.status = "running"
    reporter = JobReporter(sessions, job_id)
    try:
        result = JOB_KINDS[kind](settings, sessions, params, reporter)
    except INPUT_ERRORS as exc:  # the admin's input (a path, a model directory): one line, no traceback
        log.warning("job %s (%s) refused: %s: %s", job_id, kind, type(exc).__name__, exc)
        _finish(sessions, job_id, "failed", f"{type(exc).__name__}: {exc}", None)
        return
    except Exception as exc:  # a failed job is recorded, never lost; a fault of ours keeps its traceback
        log.error("job %s (%s) failed", job_id, kind, exc_info=True)
        _finish(sessions, job_id, "failed", f"{type(exc).__name__}: {exc}", None)
        return
    _finish(sessions, job_id, "succeeded", "done", result)


def _finish(sessions: sessionmaker[Session], job_id: str, status: str, message: str, result: dict | None) -> None:
    with session_scope(sessions) as session:
        job = session.get(Job, job_id)
        job.status, job.message, job.result = status, message, result
        if status == "succeeded":
            job.progress = 1.0


class JobRunner:
    """Submits jobs to Redis (rq) when configured, else to an in-process thread."""

    def __init__(self, settings: GatewaySettings, sessions: sessionmaker[Session]) -> None:
        self._settings, self._sessions = settings, sessions
        self._queue = None
        self._pool: ThreadPoolExecutor | None = None
        if settings.redis_url:
            import redis
            from rq import Queue

            self._queue = Queue(QUEUE_NAME, connection=redis.Redis.from_url(settings.redis_url))
        else:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="privface-job")

    @property
    def backend(self) -> str:
        return "rq" if self._queue is not None else "in-process"

    def submit(self, kind: str, params: dict) -> str:
        if kind not in JOB_KINDS:
            raise KeyError(kind)
        job_id = "job_" + uuid.uuid4().hex
        with session_scope(self._sessions) as session:
            session.add(Job(id=job_id, kind=kind, params=params))
        if self._queue is not None:
            self._queue.enqueue(execute, job_id, job_id=job_id, job_timeout=6 * 3600)
        else:
            self._pool.submit(execute, job_id, self._settings)
        return job_id

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def run_worker(settings: GatewaySettings) -> None:
    """`privface worker`: an rq worker on the privface queue."""
    import redis
    from rq import Worker

    if not settings.redis_url:
        raise SystemExit("error: PRIVFACE_REDIS_URL is not set; without Redis, jobs run inside the gateway")
    connection = redis.Redis.from_url(settings.redis_url)
    Worker([QUEUE_NAME], connection=connection).work(with_scheduler=False)
