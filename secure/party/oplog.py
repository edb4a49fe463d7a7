"""The party's two-phase operation log: prepare (durable) -> commit | abort, applied to DB and gallery.

Operations carry gateway-assigned sequence numbers. ``prepare`` stores the op durably as 'prepared'
(idempotent for identical content, 409 for conflicting content); ``commit`` applies it to the shares table
and the in-memory gallery in one step (idempotent); ``abort`` discards it (and records a tombstone for a seq
this party never heard of, so that a late prepare of that seq is refused).

Readiness of a match job (``check_ready``): a snapshot ``upto_seq`` may be used only if no op <= upto_seq is
still 'prepared' here and, when the gateway says how many ops <= upto_seq it committed
(``expected_committed``), this party committed exactly that many. Otherwise ``Behind`` (HTTP 409) tells the
gateway which seqs are pending here, so it can re-send its recorded decisions and retry.
"""
from __future__ import annotations

from collections.abc import Callable

import bisect
import hashlib
import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from secure.party.db import scrub_erased
from secure.party.gallery import DimensionMismatch, Gallery
from secure.party.models import OpRow, ShareRow, utcnow
from secure.sharing import from_bytes

log = logging.getLogger("privface.party.oplog")


class OpError(Exception):
    status = 400
    slug = "op-error"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class OpConflict(OpError):
    status, slug = 409, "op-conflict"


class OpUnknown(OpError):
    status, slug = 404, "op-unknown"


class OpInvalid(OpError):
    status, slug = 422, "op-invalid"


class Behind(OpError):
    """The party cannot serve this snapshot yet (pending ops) or disagrees with the gateway's count."""

    status, slug = 409, "behind"


class Diverged(OpError):
    status, slug = 409, "diverged"


@dataclass(frozen=True)
class OpSpec:
    seq: int
    kind: str  # store | delete
    gallery: str | None = None  # store: the gallery's name
    template_seq: int | None = None  # store
    template_seqs: tuple[int, ...] = ()  # delete
    share: bytes | None = field(default=None, repr=False)  # store: this party's share, int64 LE

    def digest(self) -> str:
        # "model_version": the gallery's key since the first release; digests of prepared ops are stored
        content = {
            "kind": self.kind, "model_version": self.gallery, "template_seq": self.template_seq,
            "template_seqs": sorted(set(self.template_seqs)),
            "share": hashlib.sha256(self.share).hexdigest() if self.share is not None else None,
        }
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    def validate(self) -> None:
        if self.seq <= 0:
            raise OpInvalid("seq must be positive")
        if self.kind == "store":
            if not self.gallery:
                raise OpInvalid("a store names its gallery")
            if self.template_seq is None or self.template_seq <= 0:
                raise OpInvalid("a store names a positive template_seq")
            if not self.share or len(self.share) % 8:
                raise OpInvalid("a store carries a non-empty int64 share")
        elif self.kind == "delete":
            if not self.template_seqs or any(t <= 0 for t in self.template_seqs):
                raise OpInvalid("a delete names one or more positive template_seqs")
        else:
            raise OpInvalid(f"unknown op kind {self.kind!r}")


class OpLog:
    """The party's op log over its database and gallery. All mutations are serialised by one lock."""

    def __init__(self, sessions: sessionmaker[Session], gallery: Gallery,
                 after_erase: Callable[[], None] | None = None) -> None:
        self.sessions = sessions
        self.gallery = gallery
        self.after_erase = after_erase  # the MPC engine drops its copies of rows (``MpcEngine.forget_rows``)
        self._lock = threading.RLock()
        self._pending: dict[int, OpSpec] = {}  # seq -> prepared op (share included: it is this party's own)
        self._pending_templates: dict[int, int] = {}  # template_seq -> seq of its prepared store
        self._committed: list[int] = []  # sorted committed seqs
        self._decided_max = 0
        self._known_max = 0

    # -- startup ----------------------------------------------------------------------------------------------
    def load(self, batch: int = 4096) -> None:
        """Rebuild the in-memory state (pending ops, committed seqs, gallery) from the database."""
        with self._lock, self.sessions() as s:
            for seq, state, kind, mv, tseq, tseqs, payload in s.execute(
                select(OpRow.seq, OpRow.state, OpRow.kind, OpRow.gallery, OpRow.template_seq,
                       OpRow.template_seqs, OpRow.payload).order_by(OpRow.seq)
            ):
                self._known_max = max(self._known_max, seq)
                if state == "prepared":
                    spec = OpSpec(seq, kind, mv, tseq, tuple(tseqs or ()), payload)
                    self._pending[seq] = spec
                    if kind == "store" and tseq is not None:
                        self._pending_templates[tseq] = seq
                elif state == "committed":
                    self._committed.append(seq)
            self._committed.sort()
            purged: dict[str, tuple[int, int]] = {}
            buf: dict[str, list[tuple[int, int, bytes]]] = {}

            def flush(mv: str) -> None:
                rows = buf.pop(mv, [])
                if rows:
                    block = np.frombuffer(b"".join(bytes(r[2]) for r in rows), dtype="<i8").astype(np.int64)
                    self.gallery.add_many(mv, np.asarray([r[0] for r in rows], np.int64),
                                          np.asarray([r[1] for r in rows], np.int64), block.reshape(len(rows), -1))

            result = s.execute(
                select(ShareRow.template_seq, ShareRow.gallery, ShareRow.dim, ShareRow.share,
                       ShareRow.add_seq, ShareRow.del_seq).order_by(ShareRow.add_seq).execution_options(yield_per=batch)
            )
            for tseq, mv, dim, share, add_seq, del_seq in result:
                if share is None:  # erased by a committed delete
                    d, p = purged.get(mv, (dim, 0))
                    purged[mv] = (dim, max(p, del_seq or 0))
                    continue
                buf.setdefault(mv, []).append((tseq, add_seq, share))
                if len(buf[mv]) >= batch:
                    flush(mv)
            for mv in list(buf):
                flush(mv)
            for mv, (dim, through) in purged.items():
                self.gallery.note_purged(mv, dim, through)
        log.info("party state loaded: %d committed ops, %d pending", len(self._committed), len(self._pending))

    # -- two-phase operations -----------------------------------------------------------------------------------
    def prepare(self, spec: OpSpec) -> str:
        """Record ``spec`` durably as prepared. Returns the op's state ('prepared' or 'committed')."""
        spec.validate()
        digest = spec.digest()
        with self._lock, self.sessions() as s:
            existing = s.get(OpRow, spec.seq)
            if existing is not None:
                if existing.digest != digest:
                    raise OpConflict(f"seq {spec.seq} is already used by another operation", seq=spec.seq)
                if existing.state == "aborted":
                    raise OpConflict(f"seq {spec.seq} was aborted", seq=spec.seq, state="aborted")
                return existing.state
            if spec.kind == "store":
                assert spec.template_seq is not None and spec.gallery is not None
                if spec.template_seq in self._pending_templates or s.get(ShareRow, spec.template_seq) is not None:
                    raise OpConflict(f"template {spec.template_seq} already exists", seq=spec.seq)
                dim = self.gallery.dim(spec.gallery)
                if dim is not None and dim != len(spec.share or b"") // 8:
                    raise OpInvalid(f"gallery {spec.gallery!r} holds {dim}-d shares", seq=spec.seq)
            else:
                busy = [t for t in spec.template_seqs if t in self._pending_templates]
                if busy:
                    raise OpConflict(f"templates {busy} have a pending store", seq=spec.seq)
            s.add(OpRow(seq=spec.seq, kind=spec.kind, template_seq=spec.template_seq,
                        template_seqs=sorted(set(spec.template_seqs)) if spec.kind == "delete" else None,
                        gallery=spec.gallery, state="prepared", payload=spec.share, digest=digest,
                        created_at=utcnow()))
            s.commit()
            self._pending[spec.seq] = spec
            if spec.kind == "store" and spec.template_seq is not None:  # validate() makes it so for a store
                self._pending_templates[spec.template_seq] = spec.seq
            self._known_max = max(self._known_max, spec.seq)
            return "prepared"

    def commit(self, seq: int) -> str:
        with self._lock, self.sessions() as s:
            op = s.get(OpRow, seq)
            if op is None:
                raise OpUnknown(f"seq {seq} was never prepared here", seq=seq)
            if op.state == "committed":
                return "committed"
            if op.state == "aborted":
                raise OpConflict(f"seq {seq} was aborted", seq=seq, state="aborted")
            spec = self._pending.get(seq) or OpSpec(seq, op.kind, op.gallery, op.template_seq,
                                                    tuple(op.template_seqs or ()), op.payload)
            if spec.kind == "store":
                share = from_bytes(spec.share or b"")
                dim = self.gallery.dim(spec.gallery or "")
                if dim is not None and dim != share.size:
                    raise OpInvalid(f"dimension mismatch for {spec.gallery!r}", seq=seq)
                s.add(ShareRow(template_seq=spec.template_seq, gallery=spec.gallery, dim=share.size,
                               share=spec.share, add_seq=seq, del_seq=None))
            else:
                for t in spec.template_seqs:
                    row = s.get(ShareRow, t)
                    if row is not None and row.del_seq is None:
                        row.del_seq = seq
                        row.share = None  # erase this party's share of the template
            op.state, op.payload, op.decided_at = "committed", None, utcnow()
            s.commit()
            # the DB is the truth; the gallery follows (a crash here is repaired by load() at restart)
            try:
                if spec.kind == "store":
                    self.gallery.add(spec.gallery or "", spec.template_seq or 0, seq, from_bytes(spec.share or b""))
                else:
                    self.gallery.erase(spec.template_seqs, seq)
            except DimensionMismatch:  # pragma: no cover - guarded above
                log.exception("gallery refused committed op %d", seq)
                raise
            self._pending.pop(seq, None)
            if spec.kind == "store" and spec.template_seq is not None:
                self._pending_templates.pop(spec.template_seq, None)
            bisect.insort(self._committed, seq)
            self._known_max = max(self._known_max, seq)
        if spec.kind == "delete":
            scrub_erased(self.sessions.kw["bind"])
            if self.after_erase is not None:
                self.after_erase()
        return "committed"

    def abort(self, seq: int) -> str:
        with self._lock, self.sessions() as s:
            op = s.get(OpRow, seq)
            if op is None:
                s.add(OpRow(seq=seq, kind="none", state="aborted", digest="", created_at=utcnow(),
                            decided_at=utcnow()))
                s.commit()
                self._known_max = max(self._known_max, seq)
                return "aborted"
            if op.state == "aborted":
                return "aborted"
            if op.state == "committed":
                raise OpConflict(f"seq {seq} is already committed", seq=seq, state="committed")
            op.state, op.payload, op.decided_at = "aborted", None, utcnow()
            s.commit()
            spec = self._pending.pop(seq, None)
            if spec is not None and spec.kind == "store" and spec.template_seq is not None:
                self._pending_templates.pop(spec.template_seq, None)
            return "aborted"

    def op_state(self, seq: int) -> str | None:
        with self.sessions() as s:
            op = s.get(OpRow, seq)
            return op.state if op else None

    # -- readiness ----------------------------------------------------------------------------------------------
    @property
    def applied_through(self) -> int:
        """Highest s such that every seq <= s known to this party is decided."""
        with self._lock:
            if self._pending:
                return min(self._pending) - 1
            return self._known_max

    def pending_seqs(self) -> list[int]:
        with self._lock:
            return sorted(self._pending)

    def committed_count(self, upto_seq: int | None = None) -> int:
        with self._lock:
            if upto_seq is None:
                return len(self._committed)
            return bisect.bisect_right(self._committed, upto_seq)

    def match_rows(self, gallery: str, upto_seq: int, expected_committed: int | None = None,
                   template_seqs: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Check readiness and take the job's gallery atomically (no commit can interleave).

        ``template_seqs`` None: the whole snapshot (identify); else only those templates (verify).
        Raises Behind / Diverged (and gallery.SnapshotTooOld).
        """
        with self._lock:
            self.check_ready(upto_seq, expected_committed)
            if template_seqs is None:
                return self.gallery.snapshot(gallery, upto_seq)
            return self.gallery.rows_for(gallery, upto_seq, template_seqs)

    def check_ready(self, upto_seq: int, expected_committed: int | None = None) -> None:
        with self._lock:
            pending = [q for q in sorted(self._pending) if q <= upto_seq]
            have = bisect.bisect_right(self._committed, upto_seq)
            info = {"pending": pending[:1000], "committed_count": have, "applied_through": self.applied_through}
            if pending:
                raise Behind(f"{len(pending)} operation(s) <= {upto_seq} are still prepared here", **info)
            if expected_committed is not None and have != expected_committed:
                if have < expected_committed:
                    raise Behind(f"committed {have} of the {expected_committed} operations <= {upto_seq}", **info)
                raise Diverged(f"committed {have} operations <= {upto_seq}, the gateway says {expected_committed}",
                               **info)
