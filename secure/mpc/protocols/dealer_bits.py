"""The dealer-bits comparison as a ``CompareProtocol`` (``PRIVFACE_MPC_COMPARE=dealer-bits``, the default).

Per job: a plan of comparisons and selections (``correlations.match_plan``), this party's correlated randomness
(drawn from the AES-CTR stream it shares with the dealer; party 0 also receives the dealer's corrections), then the
online rounds of ``compare.py`` over the parties' direct link. The dealer's work is overlapped with the scores:
``prefetch`` gives the fixed-gallery score request the arguments to start computing this job's corrections right
away, and ``request`` (party 0, right after its score answer) asks for them without waiting. Every job gets a fresh
stream id, in the same order at both parties and the dealer (which refuses a reused one).
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from secure.mpc.dealer import client as dealer_client
from secure.mpc.primitives.prg import AesCtrStream
from secure.mpc.protocols import compare, correlations
from secure.mpc.protocols.base import Comparison, CompareProtocol, JobInputs, JobKind, Output, shape_output, threshold_raw
from secure.mpc.runtime.peer_link import PeerLink


class DealerBitsComparison(Comparison):
    """One job's comparison. ``gate``: this party's query shares [Q, d]; the output is then multiplied by [the query
    is at most a unit vector] (``compare.query_ok``). A merge has no query to gate."""

    def __init__(self, rank: int, channel: compare.PeerChannel, key: bytes, stream_id: int, job: JobInputs) -> None:
        super().__init__()
        self.rank, self.channel, self.key, self.stream_id, self.job = rank, channel, key, stream_id, job
        self.kind, self.rows, self.batch = job.kind, job.compared_rows, job.batch
        self.gate = None if job.kind == "merge" else np.asarray(job.query, dtype=np.int64).reshape(max(self.batch, 1), -1)
        self.dim = 0 if self.gate is None else int(self.gate.shape[1])
        self.plan = correlations.match_plan(self.kind, self.rows, self.batch, self.dim)
        self.asked = self.prefetched = False

    def prefetch(self) -> tuple[Any, ...]:
        self.prefetched = True
        return (self.kind, self.rows, self.batch, self.stream_id, self.dim)

    def request(self) -> None:
        """Party 0 asks the dealer for its corrections: a collect if they were prefetched, else a full request."""
        if self.rank == 0 and not self.asked:
            if self.prefetched:
                dealer_client.send_request("cmp_collect", self.stream_id)
            else:
                dealer_client.send_request("cmp_corrections", self.kind, self.rows, self.batch, self.stream_id,
                                           self.dim)
            self.asked = True

    def traffic(self) -> tuple[int, int]:
        return self.channel.bytes, self.channel.rounds

    def _corrections(self) -> np.ndarray | None:
        """Party 0: the dealer's corrections for this job (asking first if nobody did); party 1 gets none."""
        if self.rank != 0:
            return None
        self.request()
        corrections: np.ndarray = dealer_client.receive_result().numpy().view(np.uint64)
        return corrections

    def finish(self, scores: Any) -> Output:
        t0 = time.perf_counter()
        if self.kind == "merge":
            self.request()
        shares = scores.cpu().numpy().view(np.uint64).reshape(self.rows, -1)
        corrections = self._corrections()
        t1 = time.perf_counter()
        source = correlations.PartySource(self.rank, AesCtrStream(self.key, self.stream_id), corrections)
        materials = list(correlations.party_materials(source, self.plan))
        t2 = time.perf_counter()
        t_raw = threshold_raw(self.job.threshold)
        if self.kind == "merge":
            out = compare.merge(self.channel, shares, t_raw, materials)
        else:
            labels = np.asarray(self.job.labels, dtype=np.int64)
            out = compare.match(self.channel, self.kind, shares, labels, t_raw, materials, query=self.gate)
        self.timings.update(compare_dealer_s=t1 - t0, compare_draw_s=t2 - t1, compare_online_s=time.perf_counter() - t2)
        return shape_output(self.job, out)


class DealerBitsCompare(CompareProtocol):
    """``key``: the comparison key derived from this party's session key with the dealer (``prg.PURPOSE_COMPARE``);
    ``link``: the parties' direct link (``peer_link.py``; None: gloo point to point)."""

    name = "dealer-bits"
    score_bits = correlations.N_BITS

    def __init__(self, rank: int, key: bytes, link: PeerLink | None) -> None:
        self.rank, self.key, self.link = rank, key, link
        self.jobs = 0  # stream id of the comparison PRG: one per job, same order at both parties

    def supports(self, kind: JobKind) -> bool:
        return True

    def start(self, job: JobInputs) -> Comparison:
        self.jobs += 1
        return DealerBitsComparison(self.rank, compare.PeerChannel(self.rank, self.link), self.key, self.jobs, job)
