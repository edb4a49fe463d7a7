"""The gateway side of the parties' ordered operation log: two-phase commit and recovery.

Every change to the parties' galleries is an `Operation` row whose `seq` orders it. The gateway first
records the intent (state `preparing`), asks both parties to prepare, then records the decision
(`committed` or `aborted`) in the same transaction as its own metadata (enrollment rows), and only then
tells the parties. A gateway that dies anywhere in between leaves a row that `reconcile` finishes:
undecided intents are aborted, decisions a party has not acknowledged are re-sent. So an enrollment is
all-or-nothing across both parties, and never duplicated.

Match jobs read a snapshot (`settled_snapshot`): every operation up to it is decided here *and* at both
parties, and it reaches every decision made before the job was asked for (read-your-writes).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.db import session_scope
from app.failpoints import failpoint
from app.models import Enrollment, Operation, OperationTotals, Subject, Tenant, unacknowledged
from secure.coordinator import PartiesUnavailable, PartyPair

log = logging.getLogger(__name__)


class KeyRotated(LookupError):
    """A store decided after its tenant's key rotation: it must not be kept (the rotation did not erase it)."""


def stale_after(party_timeout_s: float) -> float:
    """An operation still undecided this long after it began has lost its request (prepare is bounded)."""
    return party_timeout_s + 5.0


def begin(factory: sessionmaker[Session], kind: str, gallery: str, template_seqs: list[int],
          context: dict[str, Any]) -> int:
    """Record the intent of an operation and return its sequence number."""
    with session_scope(factory) as session:
        op = Operation(kind=kind, model_version=gallery, template_seqs=template_seqs, context=context)
        session.add(op)
        session.flush()
        return op.seq


def decide(factory: sessionmaker[Session], seq: int, commit: bool,
           apply: Callable[[Session, Operation], None] | None = None) -> bool:
    """Record the decision durably (with the gateway's own metadata change); False if already decided otherwise."""
    with session_scope(factory) as session:
        op = session.get(Operation, seq, with_for_update=True)
        if op is None or op.state != "preparing":
            return op is not None and op.state == ("committed" if commit else "aborted")
        op.state = "committed" if commit else "aborted"
        if commit:
            if apply is not None:
                apply(session, op)
            count_commit(session)
        return True


def count_commit(session: Session) -> None:
    """Add one to the committed total, in the transaction that commits the operation (so they never disagree)."""
    if session.execute(update(OperationTotals).where(OperationTotals.id == 1).values(
            committed=OperationTotals.committed + 1).returning(OperationTotals.id)).scalar() is None:
        raise RuntimeError("the gateway database has no operation_totals row: run `privface migrate`")


async def deliver(factory: sessionmaker[Session], pair: PartyPair, seq: int) -> bool:
    """Send a recorded decision to each party that has not acknowledged it; True when both have."""
    with session_scope(factory) as session:
        op = session.get_one(Operation, seq)
        state, acked = op.state, [op.acked_0, op.acked_1]
    if state == "preparing":
        return False
    for rank in (0, 1):
        if not acked[rank]:
            acked[rank] = await pair.decide_at(rank, seq, commit=state == "committed")
            _record_ack(factory, seq, rank, acked[rank])
            failpoint("enroll-between-acks")
    return all(acked)


def _record_ack(factory: sessionmaker[Session], seq: int, rank: int, acked: bool) -> None:
    if acked:
        with session_scope(factory) as session:
            setattr(session.get(Operation, seq), f"acked_{rank}", True)


def decided_through(session: Session) -> int:
    """The highest seq s such that every operation ≤ s is decided: the snapshot a match job may use."""
    oldest_open = session.execute(select(func.min(Operation.seq)).where(Operation.state == "preparing")).scalar()
    if oldest_open is not None:
        return int(oldest_open) - 1
    return int(session.execute(select(func.max(Operation.seq))).scalar() or 0)


def committed_through(session: Session, upto: int) -> int:
    """How many operations ≤ `upto` are committed: each party must report exactly this many for the snapshot
    (fewer means it is behind; more, or a restored backup missing data, means it diverged)."""
    after = select(func.count()).select_from(Operation).where(
        Operation.state == "committed", Operation.seq > upto).scalar_subquery()
    total = session.execute(select(OperationTotals.committed - after).where(OperationTotals.id == 1)).scalar()
    if total is None:
        raise RuntimeError("the gateway database has no operation_totals row: run `privface migrate`")
    return int(total)


def latest_decided(session: Session) -> int:
    """The highest seq already decided. A client hears of an operation only after its decision, so a
    snapshot that reaches this seq shows every write any client was told about."""
    return int(session.execute(select(func.max(Operation.seq)).where(Operation.state != "preparing")).scalar() or 0)


async def wait_decided_through(factory: sessionmaker[Session], target: int, wait_s: float) -> int:
    """Wait until every operation <= ``target`` is decided (an earlier seq may still be preparing for a
    concurrent request: prepare is bounded, so this is short); returns ``decided_through``, or raises
    TimeoutError after ``wait_s``. Polls the database so that it sees every gateway worker's decisions."""
    deadline, pause = time.monotonic() + wait_s, 0.002
    while True:
        with session_scope(factory) as session:
            upto = decided_through(session)
        if upto >= target:
            return upto
        if time.monotonic() >= deadline:
            raise TimeoutError(f"operations <= {target} still undecided after {wait_s:.0f} s")
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.05)


async def settle(factory: sessionmaker[Session], pair: PartyPair, upto: int) -> None:
    """Deliver every decision <= ``upto`` that a party has not acknowledged yet (idempotent, so racing the
    request that owns the operation is harmless). Without this a party still holds a concurrent request's
    decided operation as prepared and refuses the snapshot as 'behind'."""
    with session_scope(factory) as session:
        unacked = session.execute(select(Operation.seq).where(
            unacknowledged(), Operation.seq <= upto, Operation.state != "preparing")).scalars().all()
    await asyncio.gather(*(deliver(factory, pair, seq) for seq in unacked))


async def settled_snapshot(factory: sessionmaker[Session], pair: PartyPair, wait_s: float) -> tuple[int, int]:
    """The snapshot of a match job, as (upto, committed count): it includes every operation decided when it
    was asked for (read-your-writes), and both parties hold every decision up to it, so neither is behind."""
    with session_scope(factory) as session:
        target = latest_decided(session)
    upto = await wait_decided_through(factory, target, wait_s)
    await settle(factory, pair, upto)
    with session_scope(factory) as session:
        return upto, committed_through(session, upto)


async def reconcile(factory: sessionmaker[Session], pair: PartyPair, stale_after_s: float) -> int:
    """Finish what a crash or a lost reply left open; returns how many operations are still unacknowledged."""
    cutoff = datetime.now(timezone.utc) - timedelta(seconds=stale_after_s)
    with session_scope(factory) as session:
        stale = session.execute(select(Operation.seq).where(
            Operation.state == "preparing", Operation.created_at < cutoff)).scalars().all()
    for seq in stale:
        decide(factory, seq, commit=False)
        log.warning("operation %s was left undecided; aborted it", seq)
    with session_scope(factory) as session:
        pending = session.execute(select(Operation.seq).where(
            unacknowledged(), Operation.state != "preparing").order_by(Operation.seq)).scalars().all()
    left = 0
    for seq in pending:
        try:
            done = await deliver(factory, pair, seq)
        except PartiesUnavailable:
            done = False
        left += 0 if done else 1
    return left


def record_enrollment(session: Session, op: Operation) -> None:
    """Commit-time metadata of a store operation: the enrollment row."""
    ctx = op.context
    if session.get(Subject, ctx["subject_id"]) is None:
        raise LookupError("subject was deleted while enrolling")
    tenant = session.get(Tenant, ctx["tenant_id"])
    if tenant is None or tenant.key_version != ctx["key_version"]:
        raise KeyRotated("the tenant's key was rotated while enrolling")
    session.add(Enrollment(template_seq=op.seq, subject_id=ctx["subject_id"], tenant_id=ctx["tenant_id"],
                           model_version=ctx["model_version"], key_version=ctx["key_version"],
                           transform_id=ctx["transform_id"], epsilon=ctx.get("epsilon")))


def record_deletion(session: Session, op: Operation) -> None:
    """Commit-time metadata of a delete operation: the subject and its enrollments disappear."""
    subject = session.get(Subject, op.context["subject_id"])
    if subject is None:
        return
    for enrollment in list(subject.enrollments):
        session.delete(enrollment)
    session.delete(subject)
