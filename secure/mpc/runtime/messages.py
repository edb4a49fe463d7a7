"""The messages between a party's engine (``secure/mpc/engine.py``) and its worker process (``worker.py``).

They travel through multiprocessing queues (pickled); each is a small frozen dataclass, so both ends name fields
instead of positions. Engine -> worker: ``RunJob`` | ``CancelJob`` | ``ForgetRows`` | ``Stop``.
Worker -> engine: ``Up`` | ``JobDone`` | ``JobFailed`` | ``Down``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Union

import numpy as np

from secure.mpc.protocols.base import JobInputs, JobKind, Output


@dataclass(frozen=True)
class WorkerJob:
    """One job as queued in the worker. ``gallery`` / ``labels`` None: the snapshot this worker already holds (the
    engine did not send it again; resolved in queue order, see ``worker.Party.take``)."""

    job_id: str
    kind: JobKind
    query: np.ndarray
    gallery: np.ndarray | None
    labels: np.ndarray | None
    threshold: float
    arrived: float = 0.0       # monotonic time it reached the worker (stats: time queued)
    resident: bool = False     # the gallery is the resident snapshot (the engine's "same gallery" marker)
    members: tuple[str, ...] | None = field(default=None)  # a coalesced group: the jobs it answers, in order
    row_counts: tuple[int, ...] | None = None  # a coalesced verify: how many of the stacked rows are each member's
    sealed: Any = field(default=None, repr=False)  # sealed mode: ``sealed_model.SealedQuery`` (the query comes from it)

    @property
    def ids(self) -> tuple[str, ...]:
        """The jobs this one answers (one, or every member of a coalesced group)."""
        return self.members if self.members is not None else (self.job_id,)

    def with_gallery(self, gallery: np.ndarray, labels: np.ndarray, arrived: float, resident: bool) -> WorkerJob:
        return replace(self, gallery=gallery, labels=labels, arrived=arrived, resident=resident)

    def inputs(self) -> JobInputs:
        """What the protocols see (the gallery is resolved by then)."""
        if self.gallery is None or self.labels is None:
            raise RuntimeError(f"job {self.job_id} has no gallery snapshot")
        return JobInputs(kind=self.kind, query=self.query, gallery=self.gallery, labels=self.labels,
                         threshold=self.threshold, resident=self.resident, sealed=self.sealed,
                         row_counts=self.row_counts)


# -- engine -> worker
@dataclass(frozen=True)
class RunJob:
    job: WorkerJob


@dataclass(frozen=True)
class CancelJob:
    job_id: str


@dataclass(frozen=True)
class ForgetRows:
    """A delete committed at this party: drop every copy of gallery rows kept between jobs."""


@dataclass(frozen=True)
class Stop:
    pass


ToWorker = Union[RunJob, CancelJob, ForgetRows, Stop]


# -- worker -> engine
@dataclass(frozen=True)
class Up:
    generation: int
    device: str


@dataclass(frozen=True)
class JobDone:
    job_id: str
    share: Output
    stats: dict[str, Any]


@dataclass(frozen=True)
class JobFailed:
    job_id: str
    reason: str


@dataclass(frozen=True)
class Down:
    reason: str


FromWorker = Union[Up, JobDone, JobFailed, Down]
