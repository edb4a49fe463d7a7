"""In-memory gallery of this party's shares, one block of rows per gallery, with add/delete seqs for snapshots.

Rows are kept in growable numpy buffers (amortised O(1) append; a million 512-d rows is one
[n, d] int64 block). ``snapshot(name, upto_seq)`` returns exactly the rows added at seq <= upto_seq
and not deleted at seq <= upto_seq, in add-seq order, so both parties build identical galleries for a match
job. A snapshot with nothing filtered out is a read-only view (no copy); otherwise the last filtered
snapshot per gallery is cached until the gallery changes.

A committed delete erases its rows from memory at once (``erase``), and rows erased before this process
loaded them are never read; a snapshot older than such a delete (``upto_seq < purged_through``) would
differ from the other party's and raises ``SnapshotTooOld`` (the gateway then retries on a newer one).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

NOT_DELETED = np.iinfo(np.int64).max


class GalleryError(Exception):
    pass


class DimensionMismatch(GalleryError):
    pass


class SnapshotTooOld(GalleryError):
    pass


@dataclass
class _Rows:
    dim: int
    capacity: int = 0
    size: int = 0
    shares: np.ndarray = field(default_factory=lambda: np.empty((0, 0), np.int64))
    labels: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    add_seq: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    del_seq: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    index: dict[int, int] = field(default_factory=dict)  # template_seq -> row
    ordered: bool = True  # add_seq non-decreasing over rows
    deleted: int = 0
    max_add: int = 0
    max_del: int = 0
    purged_through: int = 0
    generation: int = 0
    cache: tuple[int, int, np.ndarray, np.ndarray] | None = None  # (generation, upto_seq, shares, labels)

    def __post_init__(self) -> None:
        if self.capacity == 0:
            self._grow(16)

    def _grow(self, need: int) -> None:
        cap = max(need, 2 * self.capacity, 16)
        shares = np.empty((cap, self.dim), np.int64)
        labels = np.empty(cap, np.int64)
        add = np.empty(cap, np.int64)
        dele = np.full(cap, NOT_DELETED, np.int64)
        if self.size:
            shares[: self.size] = self.shares[: self.size]
            labels[: self.size] = self.labels[: self.size]
            add[: self.size] = self.add_seq[: self.size]
            dele[: self.size] = self.del_seq[: self.size]
        self.shares, self.labels, self.add_seq, self.del_seq, self.capacity = shares, labels, add, dele, cap


class Gallery:
    """Thread-safe in-memory share galleries, keyed by gallery name."""

    def __init__(self) -> None:
        self._galleries: dict[str, _Rows] = {}
        self._where: dict[int, str] = {}  # template_seq -> the gallery holding it
        self._lock = threading.RLock()

    # -- mutation -------------------------------------------------------------------------------------------
    def dim(self, name: str) -> int | None:
        with self._lock:
            v = self._galleries.get(name)
            return v.dim if v else None

    def add(self, name: str, template_seq: int, add_seq: int, share: np.ndarray) -> None:
        """Append one row (idempotent for an identical template_seq/add_seq)."""
        self.add_many(name, np.asarray([template_seq]), np.asarray([add_seq]),
                      np.asarray(share, np.int64).reshape(1, -1))

    def add_many(self, name: str, template_seqs: np.ndarray, add_seqs: np.ndarray, shares: np.ndarray,
                 del_seqs: np.ndarray | None = None) -> None:
        shares = np.asarray(shares, np.int64)
        if shares.ndim != 2:
            raise ValueError("shares must be [n, d]")
        n, d = shares.shape
        if n == 0:
            return
        with self._lock:
            v = self._galleries.get(name)
            if v is None:
                v = self._galleries[name] = _Rows(dim=d)
            if d != v.dim:
                raise DimensionMismatch(f"gallery {name!r} holds {v.dim}-d shares, got {d}")
            keep = []
            for i, t in enumerate(template_seqs.tolist()):
                if t in self._where:
                    row = self._galleries[self._where[t]].index[t]
                    if self._galleries[self._where[t]].add_seq[row] != int(add_seqs[i]):
                        raise GalleryError(f"template {t} already present with another add seq")
                    continue
                keep.append(i)
            if not keep:
                return
            if len(keep) != n:
                idx = np.asarray(keep)
                template_seqs, add_seqs, shares = template_seqs[idx], add_seqs[idx], shares[idx]
                del_seqs = del_seqs[idx] if del_seqs is not None else None
                n = len(keep)
            if v.size + n > v.capacity:
                v._grow(v.size + n)
            s, e = v.size, v.size + n
            v.shares[s:e] = shares
            v.labels[s:e] = template_seqs
            v.add_seq[s:e] = add_seqs
            if del_seqs is not None:
                v.del_seq[s:e] = del_seqs
                dmask = del_seqs != NOT_DELETED
                v.deleted += int(dmask.sum())
                if dmask.any():
                    v.max_del = max(v.max_del, int(del_seqs[dmask].max()))
            first = int(add_seqs[0])
            if (s > 0 and first < int(v.add_seq[s - 1])) or (n > 1 and bool(np.any(np.diff(add_seqs) < 0))):
                v.ordered = False
            v.max_add = max(v.max_add, int(add_seqs.max()))
            for j, t in enumerate(template_seqs.tolist()):
                v.index[t] = s + j
                self._where[t] = name
            v.size = e
            v.generation += 1

    def delete(self, template_seq: int, del_seq: int) -> bool:
        """Erase one row at ``del_seq`` (see ``erase``). False if the template is not held here."""
        return self.erase([template_seq], del_seq) == 1

    def erase(self, template_seqs: list[int] | tuple[int, ...], del_seq: int) -> int:
        """Remove rows from memory for good (a committed delete); returns how many were held here.

        Erasure must be real: the rows are dropped from fresh buffers (copy-on-write, like ``_sort``, so a
        snapshot view handed to a running job stays valid; the old buffer is freed when that job ends), and
        snapshots older than ``del_seq`` are refused from now on (``SnapshotTooOld``), exactly as after a
        restart that skipped erased rows. Costs one copy of the gallery's rows per delete operation.
        """
        with self._lock:
            by_gallery: dict[str, list[int]] = {}
            for t in {int(t) for t in template_seqs}:
                mv = self._where.pop(t, None)
                if mv is not None:
                    by_gallery.setdefault(mv, []).append(t)
            for mv, seqs in by_gallery.items():
                self._compact(self._galleries[mv], seqs, del_seq)
            return sum(len(seqs) for seqs in by_gallery.values())

    @staticmethod
    def _compact(v: _Rows, template_seqs: list[int], del_seq: int) -> None:
        """Rebuild ``v`` without ``template_seqs`` (all present in ``v``). Call with the lock held."""
        gone = np.asarray([v.index.pop(t) for t in template_seqs], dtype=np.int64)
        keep = np.ones(v.size, dtype=bool)
        keep[gone] = False
        v.deleted -= int(np.count_nonzero(v.del_seq[gone] != NOT_DELETED))
        m, cap = int(keep.sum()), v.capacity
        shares = np.empty((cap, v.dim), np.int64)
        shares[:m] = v.shares[: v.size][keep]
        labels = np.empty(cap, np.int64)
        labels[:m] = v.labels[: v.size][keep]
        add = np.empty(cap, np.int64)
        add[:m] = v.add_seq[: v.size][keep]
        dele = np.full(cap, NOT_DELETED, np.int64)
        dele[:m] = v.del_seq[: v.size][keep]
        v.shares, v.labels, v.add_seq, v.del_seq, v.size = shares, labels, add, dele, m
        v.index = {int(t): i for i, t in enumerate(labels[:m].tolist())}
        v.purged_through = max(v.purged_through, del_seq)
        v.max_del = max(v.max_del, del_seq)
        v.generation += 1
        v.cache = None

    def note_purged(self, name: str, dim: int | None, through_seq: int) -> None:
        """Record that rows deleted at seq <= through_seq were erased before loading (see SnapshotTooOld)."""
        with self._lock:
            v = self._galleries.get(name)
            if v is None:
                if dim is None:
                    return
                v = self._galleries[name] = _Rows(dim=dim)
            v.purged_through = max(v.purged_through, through_seq)

    def _sort(self, v: _Rows) -> None:
        order = np.argsort(v.add_seq[: v.size], kind="stable")
        # fresh arrays: views handed out earlier stay valid and unchanged
        cap = v.capacity
        shares = np.empty((cap, v.dim), np.int64)
        shares[: v.size] = v.shares[order]
        labels = np.empty(cap, np.int64)
        labels[: v.size] = v.labels[order]
        add = np.empty(cap, np.int64)
        add[: v.size] = v.add_seq[order]
        dele = np.full(cap, NOT_DELETED, np.int64)
        dele[: v.size] = v.del_seq[order]
        v.shares, v.labels, v.add_seq, v.del_seq = shares, labels, add, dele
        v.index = {int(t): i for i, t in enumerate(v.labels[: v.size].tolist())}
        v.ordered = True

    # -- reads ----------------------------------------------------------------------------------------------
    def snapshot(self, name: str, upto_seq: int) -> tuple[np.ndarray, np.ndarray]:
        """(shares [n, d] int64, labels [n] int64) of the rows visible at ``upto_seq``, in add-seq order."""
        with self._lock:
            v = self._readable(name, upto_seq)
            if v is None:
                return np.empty((0, 0), np.int64), np.empty(0, np.int64)
            if not v.ordered:
                self._sort(v)
            n = v.size
            if upto_seq >= v.max_add and (v.deleted == 0 or self._none_deleted_by(v, upto_seq)):
                shares, labels = v.shares[:n], v.labels[:n]
            elif v.cache is not None and v.cache[0] == v.generation and v.cache[1] == upto_seq:
                return v.cache[2], v.cache[3]
            else:
                mask = (v.add_seq[:n] <= upto_seq) & (v.del_seq[:n] > upto_seq)
                shares, labels = v.shares[:n][mask], v.labels[:n][mask]
                shares.flags.writeable = False
                labels.flags.writeable = False
                v.cache = (v.generation, upto_seq, shares, labels)
                return shares, labels
            shares = shares.view()
            labels = labels.view()
            shares.flags.writeable = False
            labels.flags.writeable = False
            return shares, labels

    def _readable(self, name: str, upto_seq: int) -> _Rows | None:
        """The gallery to read at ``upto_seq`` (None if it has no rows yet); refuses snapshots older than
        deletions already erased from memory. Call with the lock held."""
        v = self._galleries.get(name)
        if v is not None and upto_seq < v.purged_through:
            raise SnapshotTooOld(f"snapshot {upto_seq} predates deletions already erased ({v.purged_through})")
        return v

    @staticmethod
    def _none_deleted_by(v: _Rows, upto_seq: int) -> bool:
        return not bool(np.any(v.del_seq[: v.size] <= upto_seq))

    def rows_for(self, name: str, upto_seq: int, template_seqs: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """The visible rows among ``template_seqs`` (verify), in add-seq order."""
        with self._lock:
            v = self._readable(name, upto_seq)
            if v is None:
                return np.empty((0, 0), np.int64), np.empty(0, np.int64)
            rows = []
            for t in set(int(t) for t in template_seqs):
                r = v.index.get(t)
                if r is not None and v.add_seq[r] <= upto_seq < v.del_seq[r]:
                    rows.append(r)
            rows.sort(key=lambda r: int(v.add_seq[r]))
            idx = np.asarray(rows, dtype=np.int64)
            return v.shares[idx].copy(), v.labels[idx].copy()

    def counts(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {mv: {"rows": v.size - v.deleted, "deleted": v.deleted, "dim": v.dim}
                    for mv, v in self._galleries.items()}

    def has(self, template_seq: int) -> bool:
        with self._lock:
            return template_seq in self._where
