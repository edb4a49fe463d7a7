"""What a match protocol is: a score step and a comparison step, each an object with one job to do.

Every job runs the same pipeline (``run_match``): the comparison step is started first (so that it can ask the
dealer for its correlated randomness early), the score step turns this party's shares of the query and the gallery
into shares of the raw scores, and the comparison turns those into this party's share of the output. Values are
CrypTen-compatible: int64 shares in Z_2^64 at integer scale (query and gallery rows at 2^16, scores at 2^32), so no
probabilistic truncation is ever needed.

Outputs, per job kind (the threshold T is public, ``threshold_raw``):
* verify:        [max_i score_i >= T]                      (one bit per query; a coalesced batch of verifies
                 stacks every query's own rows, and query j's max runs over its rows only: ``own_rows``)
* identify:      [max_i score_i >= T] * label(argmax_i)    (the label or 0; the lowest row wins ties)
* identify-best: the knockout winner, shares of [Q scores, Q labels], no threshold (a shard's candidate)
* merge:         identify over the shard winners (``sharding.py``); its "gallery" rows are those winners' shares
* embed:         sealed mode's enrollment: this party's share of the protected template [d], never opened (no
                 gallery, no comparison); a sealed verify is a verify whose query is computed the same way first

Why objects: the 2x2 matrix of implementations (naive or fixed-gallery scores x CrypTen or dealer-bits comparison)
is chosen once per worker, and the job loop never asks which one it runs.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import numpy as np

JobKind = Literal["verify", "identify", "identify-best", "merge", "embed"]
RAW_SCALE = 1 << 32  # scale of a product of two 16-bit fixed-point numbers
Output = Union[int, list[int], list[list[int]]]  # one query: an int; a batch or a shard's winner: a list


def threshold_raw(threshold: float) -> int:
    """Smallest integer raw score (scale 2^32) that counts as ``>= threshold``."""
    return int(math.ceil(float(threshold) * RAW_SCALE))


@dataclass(frozen=True)
class JobInputs:
    """One job as a protocol sees it at this party: its own shares and the public parameters."""

    kind: JobKind
    query: np.ndarray      # int64 [d], or [Q, d] for a batch (merge: zeros [Q])
    gallery: np.ndarray    # int64 [n, d] (merge: [K, 2Q], each row a shard winner's score and label shares)
    labels: np.ndarray     # int64 [n], public and positive
    threshold: float
    resident: bool = False  # the gallery is the snapshot this worker already held (the engine sent "same gallery")
    sealed: Any = field(default=None, repr=False)  # sealed mode: a ``sealed_model.SealedQuery`` the query comes from
    row_counts: tuple[int, ...] | None = None  # coalesced verify: gallery rows per query, in order (they sum to n)

    @property
    def batch(self) -> int:
        """Q for a batch of Q queries, 0 for one query."""
        if self.kind == "merge":
            return int(self.gallery.shape[1]) // 2
        return int(self.query.shape[0]) if self.query.ndim == 2 else 0

    @property
    def rows(self) -> int:
        return int(self.gallery.shape[0])

    @property
    def compared_rows(self) -> int:
        """Rows the comparison's knockout runs over per query: a coalesced verify's largest member, else all."""
        return max(self.row_counts) if self.row_counts else self.rows


def own_rows(scores: Any, row_counts: tuple[int, ...]) -> Any:
    """Scores [n, Q] of a coalesced verify (every stacked row against every query) -> [m, Q], m = the largest
    count: column j holds query j's own rows, the shorter columns filled with repeats of their first own row (a
    repeat leaves the max unchanged, so no padding value has to be chosen). Local: the row counts are public."""
    import torch

    m = max(row_counts)
    starts = np.cumsum((0,) + tuple(row_counts[:-1]))
    index = np.array([[start + (k if k < count else 0) for start, count in zip(starts, row_counts)]
                      for k in range(m)], dtype=np.int64)
    return torch.gather(scores, 0, torch.from_numpy(index).to(scores.device))


def shape_output(job: JobInputs, out: np.ndarray) -> Output:
    """Output shares as the engine answers them: an int for one query, a list for a batch, for a shard's winner
    ([Q scores, Q labels]) and for a merge."""
    values = np.asarray(out).astype(np.int64, copy=False).reshape(-1)
    if job.query.ndim == 2 or job.kind in ("identify-best", "merge"):
        return [int(v) for v in values.tolist()]
    return int(values[0])


class Comparison(ABC):
    """The comparison step of one job. ``prefetch`` / ``request`` let the score step overlap the dealer's work for
    the comparison with its own (the dealer-bits protocol); a comparison that needs no dealer ignores them."""

    timings: dict[str, float]

    def __init__(self) -> None:
        self.timings = {}

    def prefetch(self) -> tuple[Any, ...] | None:
        """Arguments that ride along with the score step's dealer request (None: nothing to prepare)."""
        return None

    def request(self) -> None:
        """Ask the dealer for this job's material now, without waiting for it."""

    def traffic(self) -> tuple[int, int]:
        """(bytes, rounds) this step exchanged outside CrypTen's communicator (its own counters see the rest)."""
        return 0, 0

    @abstractmethod
    def finish(self, scores: Any) -> Output:
        """This party's share of the output from its shares of the scores (int64 tensor [n] or [n, Q])."""


class CompareProtocol(ABC):
    """Turns shares of the scores into shares of the output."""

    name: str
    score_bits: int  # the comparison reads the scores modulo 2^score_bits (a score step may exploit it)

    @abstractmethod
    def start(self, job: JobInputs) -> Comparison:
        """The comparison of one job (both parties start their jobs in the same order)."""

    def supports(self, kind: JobKind) -> bool:
        return kind in ("verify", "identify")


class ScoreProtocol(ABC):
    """Turns shares of the query and the gallery into shares of the raw scores (scale 2^32)."""

    name: str

    @abstractmethod
    def scores(self, job: JobInputs, comparison: Comparison) -> Any:
        """This party's int64 shares of G q: a torch tensor [n] for one query, [n, Q] for a batch."""

    def stats(self) -> dict[str, Any]:
        """What the last job cost this step (rows masked, seconds per step) for the job's stats."""
        return {"setup_rows": 0}

    def new_snapshot(self) -> None:
        """Another gallery snapshot became resident in this worker: nothing cached about the last one holds."""

    def forget(self) -> None:
        """A delete committed at this party: drop every cached copy of gallery rows."""


@dataclass
class MatchProtocol:
    """The protocols a worker runs: identify's score step, verify's (always the per-job Beaver product: a handful of
    rows gains nothing from cached masks), and the comparison."""

    identify_scores: ScoreProtocol
    verify_scores: ScoreProtocol
    compare: CompareProtocol
    last_scores: ScoreProtocol | None = field(default=None, repr=False)
    embedder: Any = field(default=None, repr=False)  # sealed mode: a ``sealed_model.SealedEmbedder`` (TTP only)

    def scores_for(self, kind: JobKind) -> ScoreProtocol:
        return self.verify_scores if kind == "verify" else self.identify_scores

    def refusal(self, kind: JobKind) -> str | None:
        """Why this worker cannot run a job of ``kind`` (None: it can)."""
        if kind == "embed":
            return None if self.embedder is not None else "sealed jobs need the TTP provider"
        if self.compare.supports(kind):
            return None
        return f"{kind} jobs need PRIVFACE_MPC_COMPARE=dealer-bits (and TTP)"

    def run(self, job: JobInputs) -> tuple[Output, Comparison]:
        """This party's output share of ``job`` (n >= 1), and its comparison (for traffic and timings)."""
        import torch

        if job.rows < 1:
            raise ValueError("a match job needs at least one gallery row")
        comparison = self.compare.start(job)
        if job.kind == "merge":  # no scores to compute: the "gallery" rows are the shard winners' shares
            self.last_scores = None
            return comparison.finish(torch.from_numpy(np.ascontiguousarray(job.gallery, dtype=np.int64))), comparison
        self.last_scores = self.scores_for(job.kind)
        scores = self.last_scores.scores(job, comparison)
        if job.row_counts:
            scores = own_rows(scores, job.row_counts)
        return comparison.finish(scores), comparison

    def sealed_query(self, job: JobInputs) -> np.ndarray:
        """This party's share of a sealed job's protected query, int64 [B, d] (computed with the peer, under MPC)."""
        if self.embedder is None:
            raise RuntimeError("this worker has no sealed-mode embedder")
        query: np.ndarray = self.embedder.query(job.sealed)
        return query

    def new_snapshot(self) -> None:
        self.identify_scores.new_snapshot()

    def forget(self) -> None:
        self.identify_scores.forget()
