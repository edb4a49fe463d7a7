"""The parties' control loop inside one generation: party 0 leads, party 1 follows.

* idle: party 0 broadcasts {"t": "hb"} to party 1 and pings the dealer every heartbeat period, so silent peers are
  detected by the gloo timeout (op_timeout_s) even with no traffic;
* job: party 0 broadcasts {"t": "job", id, ids, n, d, digest} for the oldest job (or a coalesced group,
  ``coalesce.py``); party 1 waits up to pair_wait_s for the same job id from its own supervisor; both
  all-reduce(MIN) an "I have it and it matches" flag; both run it or both skip it.

The announcements depend only on the queue (ids, sizes, public labels), never on a result. The job itself runs
through the worker's ``MatchProtocol`` (``protocols/base.py``).
"""
from __future__ import annotations

import collections
import json
from abc import ABC, abstractmethod
import queue
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from secure.mpc.protocols.base import MatchProtocol, Output
from secure.mpc.runtime.coalesce import COALESCE_WAIT_S, coalescible, combined_job, digest_of, split_output
from secure.mpc.runtime.messages import (
    CancelJob,
    Down,
    ForgetRows,
    JobDone,
    JobFailed,
    RunJob,
    Stop,
    ToWorker,
    WorkerJob,
)
from secure.mpc.settings import MpcSettings

JobRunner = Callable[[WorkerJob], tuple[Output, dict[str, Any]]]  # runs one job in lockstep: (share, stats)
PROTOCOL_VERSION = 6  # 3: dealer-bits comparison; 4: public labels at level 1; 5: AES-CTR TTP streams from
# authenticated X25519 session keys, the query gate (compare.query_ok); 6: coalesced verify jobs (row_counts)


class Party(ABC):
    """One party's worker state: its queue of jobs, the resident gallery snapshot, its protocols and links."""

    def __init__(self, rank: int, settings: MpcSettings, protocol: MatchProtocol, runner: JobRunner, inq: Any,
                 outq: Any, device: str, group: Any) -> None:
        import torch
        import torch.distributed as dist

        self.torch, self.dist, self.group = torch, dist, group
        self.rank, self.settings, self.protocol = rank, settings, protocol
        self.runner, self.inq, self.outq, self.device = runner, inq, outq, device
        self.hb = settings.effective_heartbeat_s()
        self.pair_wait = settings.effective_pair_wait_s()
        self.jobs: collections.OrderedDict[str, WorkerJob] = collections.OrderedDict()
        self.stopping = False
        self.last_gallery: np.ndarray | None = None  # resident snapshot: the engine omits an unchanged gallery
        self.last_labels: np.ndarray | None = None   # ... and its labels

    # -- group messaging (JSON over uint8 tensors, no pickle)
    def bcast(self, obj: dict[str, Any] | None = None) -> dict[str, Any]:
        torch, dist = self.torch, self.dist
        if self.rank == 0:
            assert obj is not None
            data = json.dumps(obj).encode()
            dist.broadcast(torch.tensor([len(data)], dtype=torch.long), 0, group=self.group)
            dist.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8), 0, group=self.group)
            return obj
        size = torch.zeros(1, dtype=torch.long)
        dist.broadcast(size, 0, group=self.group)
        buf = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.broadcast(buf, 0, group=self.group)
        out: dict[str, Any] = json.loads(bytes(buf.numpy()).decode())
        return out

    def agree(self, ok: bool) -> bool:
        flag = self.torch.tensor([1 if ok else 0], dtype=self.torch.long)
        self.dist.all_reduce(flag, op=self.dist.ReduceOp.MIN, group=self.group)
        return bool(flag.item())

    def hello(self) -> None:
        """Check that both parties run the same protocol version on the same device type."""
        mine = {"t": "hello", "proto": PROTOCOL_VERSION, "device": self.device,
                "scores": self.protocol.identify_scores.name, "compare": self.protocol.compare.name}
        theirs = self.bcast(mine if self.rank == 0 else None)
        if not self.agree(theirs == mine):
            raise RuntimeError(f"parties disagree on protocol/device: party 0 {theirs}, this party {mine}"
                               if self.rank == 1 else "party 1 runs another protocol version or device type")

    # -- local queue
    def handle(self, msg: ToWorker) -> None:
        if isinstance(msg, RunJob):
            self.take(msg.job)
        elif isinstance(msg, ForgetRows):  # a delete committed at this party (MpcEngine.forget_rows)
            self.last_gallery = self.last_labels = None
            self.protocol.forget()
        elif isinstance(msg, CancelJob):
            self.jobs.pop(msg.job_id, None)
        elif isinstance(msg, Stop):
            self.stopping = True

    def take(self, job: WorkerJob) -> None:
        """Queue a job, resolving the "same gallery" marker in queue order: it is the snapshot sent just before."""
        now = time.monotonic()
        if job.gallery is None:
            if self.last_gallery is None or self.last_labels is None:
                self.fail_ids((job.job_id,), "no resident gallery snapshot")
                return
            job = job.with_gallery(self.last_gallery, self.last_labels, now, resident=True)
        else:
            job = job.with_gallery(job.gallery, job.labels if job.labels is not None else np.zeros(0, np.int64),
                                   now, resident=False)
            if job.kind not in ("merge", "embed"):  # neither is a gallery snapshot to keep resident
                self.last_gallery, self.last_labels = job.gallery, job.labels
                self.protocol.new_snapshot()  # the score step's cached row keys are not this snapshot's
        self.on_job(job)

    def on_job(self, job: WorkerJob) -> None:
        self.jobs[job.job_id] = job

    def poll(self, timeout: float) -> None:
        """Take everything waiting on the in-queue; block up to ``timeout`` for the first item."""
        try:
            msg = self.inq.get(timeout=timeout) if timeout > 0 else self.inq.get_nowait()
        except queue.Empty:
            return
        self.handle(msg)
        while True:
            try:
                self.handle(self.inq.get_nowait())
            except queue.Empty:
                return

    def digest(self, job: WorkerJob) -> str:
        return digest_of(job, self.device)

    @abstractmethod
    def run(self, ping_dealer: Callable[[], None] | None = None) -> None:
        """Serve jobs until stopped or until the session breaks (then raise)."""

    # -- running a job
    def run_job(self, job: WorkerJob) -> None:
        """Run ``job`` (both parties do, in lockstep) and report every job it answers. A failure inside the MPC ends
        this generation: "down" first, so that by the time the caller sees its job fail, status() says so."""
        reason = self.protocol.refusal(job.kind)
        if reason is not None:
            self.fail_ids(job.ids, reason)
            return
        try:
            share, stats = self.runner(job)
        except BaseException as exc:
            reason = f"session failed: {type(exc).__name__}: {str(exc)[:500]}"
            self.outq.put(Down(reason))
            self.fail_ids(job.ids, f"MPC failed, peer or dealer lost ({reason})")
            raise
        if job.members is not None:
            stats["coalesced"] = len(job.members)  # one batched job answered these queries; stats are the whole job's
        for job_id, member_share in split_output(job, share):
            self.outq.put(JobDone(job_id, member_share, stats))

    def fail_ids(self, ids: tuple[str, ...], reason: str) -> None:
        for job_id in ids:
            self.outq.put(JobFailed(job_id, reason))


class Leader(Party):
    """Party 0: announces each job (or coalesced group) and the heartbeats."""

    def take_group(self, limit: int) -> list[WorkerJob]:
        """Pop the oldest job and up to ``limit`` - 1 coalescible jobs queued right behind it (queue order is
        kept: a job of another kind or gallery ends the group)."""
        _, first = self.jobs.popitem(last=False)
        group = [first]
        while len(group) < limit and self.jobs:
            job_id, nxt = next(iter(self.jobs.items()))
            if not coalescible(first, nxt, self.settings.coalesce_verify):
                break
            group.append(self.jobs.pop(job_id))
        return group

    def announce(self, limit: int) -> bool:
        """Announce and run the next group; False when the peer lacked a member (the group is queued again)."""
        group = self.take_group(limit)
        job = combined_job(group)
        g = job.gallery
        assert g is not None
        self.bcast({"t": "job", "id": job.job_id, "ids": [x.job_id for x in group],
                    "n": int(g.shape[0]), "d": int(g.shape[1]), "digest": self.digest(job)})
        if self.agree(True):
            self.run_job(job)
            return True
        if len(group) > 1:  # both parties keep the jobs queued; the first is announced alone next
            for x in reversed(group):
                self.jobs[x.job_id] = x
                self.jobs.move_to_end(x.job_id, last=False)
            return False
        self.fail_ids(job.ids, "the peer party did not submit this job in time (or its parameters differ); "
                               "skipped by both")
        return True

    def heartbeat(self, ping_dealer: Callable[[], None] | None) -> None:
        self.bcast({"t": "hb"})
        self.agree(True)  # a round trip: a frozen (not just dead) peer is caught by the gloo timeout
        if ping_dealer is not None:
            ping_dealer()

    def run(self, ping_dealer: Callable[[], None] | None = None) -> None:
        last_hb = time.monotonic()
        alone_next = False  # the peer lacked a member of the last coalesced group: run its first job alone
        while not self.stopping:
            wait = 0.0 if self.jobs else max(0.0, self.hb - (time.monotonic() - last_hb))
            self.poll(wait)
            if self.stopping:
                return
            if self.jobs:
                alone_next = not self.announce(1 if alone_next else int(self.settings.coalesce_max))
            if time.monotonic() - last_hb >= self.hb:
                self.heartbeat(ping_dealer)
                last_hb = time.monotonic()


class Follower(Party):
    """Party 1: runs what party 0 announces, if it holds the same job."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.skipped: collections.OrderedDict[str, None] = collections.OrderedDict()

    def on_job(self, job: WorkerJob) -> None:
        if job.job_id in self.skipped:
            self.fail_ids((job.job_id,), "party 0 already announced this job and it was skipped")
            return
        self.jobs[job.job_id] = job

    def wait_for(self, ids: list[str], seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while any(i not in self.jobs for i in ids) and time.monotonic() < deadline:
            self.poll(deadline - time.monotonic())

    def run_group(self, msg: dict[str, Any]) -> None:
        """Party 0 announced a coalesced group: run it if every member is here (after a short wait) and forms
        the same batch; else agree "no" and keep the jobs queued (party 0 then announces the first one alone)."""
        ids = list(msg["ids"])
        self.wait_for(ids, min(self.pair_wait, COALESCE_WAIT_S))
        found = [self.jobs.get(i) for i in ids]
        group = [x for x in found if x is not None]
        verify = self.settings.coalesce_verify
        ok = len(group) == len(ids) and all(coalescible(group[0], x, verify) for x in group[1:])
        job = combined_job(group) if ok else None
        if self.agree(job is not None and self.digest(job) == msg.get("digest")):
            assert job is not None
            for i in ids:
                self.jobs.pop(i, None)
            self.run_job(job)

    def run_one(self, msg: dict[str, Any]) -> None:
        jid = msg["id"]
        job = self.jobs.pop(jid, None)
        if self.agree(job is not None and self.digest(job) == msg.get("digest")):
            assert job is not None
            self.run_job(job)
        elif job is not None:
            self.fail_ids((jid,), "the parties disagree on this job (n, d, kind, threshold or labels)")
        else:
            self.skipped[jid] = None
            while len(self.skipped) > 1024:
                self.skipped.popitem(last=False)

    def run(self, ping_dealer: Callable[[], None] | None = None) -> None:
        while not self.stopping:
            msg = self.bcast()  # raises after op_timeout_s without a word from party 0
            self.poll(0)
            if self.stopping:
                return
            if msg.get("t") == "hb":
                self.agree(True)
                continue
            if msg.get("t") != "job":
                continue
            self.wait_for([msg["id"]], self.pair_wait)
            if len(msg.get("ids", [msg["id"]])) > 1:
                self.run_group(msg)
            else:
                self.run_one(msg)
