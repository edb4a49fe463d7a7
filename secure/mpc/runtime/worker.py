"""Per-generation worker process of a party (rank 0/1): one CrypTen/gloo session, then the party's loop.

A worker joins the 3-process gloo group (2 with the test-only TFP provider), serves until anything goes wrong
(peer died, timeout, rendezvous failed), then exits; its supervisor (``MpcEngine``) starts a fresh one — a new
"generation" — so a broken gloo group is never reused (``session.py``: it also dies with its supervisor).

Set-up order, the same at both parties: CrypTen (``session.init_crypten``), the parties' session key
(``link_keys``: proves each holds the party link's credential), the protocols (``build_protocol``), the hello (same
protocol version, device and protocols), the direct link of the dealer-bits comparison (``peer_link.py``), then the
leader or follower loop (``party.py``). The engine <-> worker messages are ``messages.py``.
"""
from __future__ import annotations

import time
from dataclasses import replace
from types import ModuleType
from typing import Any

from secure.mpc.protocols.base import CompareProtocol, MatchProtocol, Output, ScoreProtocol
from secure.mpc.runtime.messages import Down, Up, WorkerJob
from secure.mpc.runtime.party import Follower, Leader, Party
from secure.mpc.runtime.session import die_with_parent, exit_now, init_crypten, resolve_device
from secure.mpc.settings import MpcSettings


def build_protocol(crypten: ModuleType, rank: int, settings: MpcSettings, device: str) -> MatchProtocol:
    """The protocols this worker runs, from the settings. The test-only TFP provider has no dealer: it runs the
    CrypTen baseline (no dealer to hold the fixed-gallery masks or make the comparison's bits)."""
    from secure.mpc.protocols.crypten_compare import CrypTenCompare
    from secure.mpc.protocols.naive_scores import NaiveScores

    ttp = settings.provider == "TTP"
    compare: CompareProtocol = CrypTenCompare(crypten, rank, device)
    if ttp and settings.compare == "dealer-bits":
        from secure.mpc.primitives import prg
        from secure.mpc.protocols.dealer_bits import DealerBitsCompare
        from secure.mpc.runtime import crypten_rng

        # the comparison's key: derived from this session's key with the dealer (prg.py)
        compare = DealerBitsCompare(rank, prg.derive_key(crypten_rng.session_key(), prg.PURPOSE_COMPARE), None)
    naive = NaiveScores(crypten, device)
    identify: ScoreProtocol = naive
    if ttp and settings.protocol == "fixed-gallery":
        from secure.mpc.protocols.fixed_gallery import FixedGalleryScores

        identify = FixedGalleryScores(crypten, rank, device, mod38=compare.score_bits < 64)
    embedder = None
    if ttp:  # sealed mode: the student's squares take Beaver triples from the dealer's AES-CTR streams
        from secure.mpc.protocols.sealed_model import SealedEmbedder

        embedder = SealedEmbedder(crypten, device)
    return MatchProtocol(identify_scores=identify, verify_scores=naive, compare=compare, embedder=embedder)


class JobRunner:
    """Runs one job through the protocols and measures it: (output share, stats)."""

    def __init__(self, comm: Any, protocol: MatchProtocol) -> None:
        self.comm, self.protocol = comm, protocol

    def __call__(self, job: WorkerJob) -> tuple[Output, dict[str, Any]]:
        self.comm.reset_communication_stats()
        t0, cpu0 = time.perf_counter(), time.process_time()
        inputs = job.inputs()
        if inputs.sealed is not None:  # sealed mode: the query is this party's share of the MPC's own embedding
            query = self.protocol.sealed_query(inputs)
            if job.kind == "embed":  # enrollment: the template share stays at this party, nothing is opened
                return [int(v) for v in query.reshape(-1)], self._sealed_stats(t0, cpu0)
            inputs = replace(inputs, query=query.reshape(inputs.query.shape))
        share, comparison = self.protocol.run(inputs)
        st = self.comm.get_communication_stats()
        link_bytes, link_rounds = comparison.traffic()
        scores = self.protocol.last_scores
        stats: dict[str, Any] = {
            "bytes": int(st["bytes"]) + link_bytes, "rounds": int(st["rounds"]) + link_rounds,
            "comm_s": float(st["time"]), "mpc_s": time.perf_counter() - t0,
            "cpu_s": time.process_time() - cpu0,  # this process's CPU time in the job (all its threads)
            "queued_s": t0 - (job.arrived or t0),  # waited in this worker's queue (the group's oldest job)
            "protocol": scores.name if scores is not None else "naive", "compare": self.protocol.compare.name,
            **comparison.timings, **(scores.stats() if scores is not None else {"setup_rows": 0})}
        return share, stats

    def _sealed_stats(self, t0: float, cpu0: float) -> dict[str, Any]:
        st = self.comm.get_communication_stats()
        return {"bytes": int(st["bytes"]), "rounds": int(st["rounds"]), "comm_s": float(st["time"]),
                "mpc_s": time.perf_counter() - t0, "cpu_s": time.process_time() - cpu0, "protocol": "sealed-embed",
                "compare": "none", "setup_rows": 0}


def _open_peer_link(rank: int, settings: MpcSettings, protocol: MatchProtocol, key: bytes) -> None:
    """The direct party-to-party socket of the dealer-bits comparison; after the hello, so both parties are known
    to want it."""
    from secure.mpc.protocols.dealer_bits import DealerBitsCompare

    if isinstance(protocol.compare, DealerBitsCompare):
        from secure.mpc.runtime.peer_link import open_link

        protocol.compare.link = open_link(rank, settings.master_addr, settings.connect_timeout_s,
                                          settings.op_timeout_s, key)


def _ping_dealer() -> None:
    from crypten.mpc.provider.ttp_provider import TTPClient

    TTPClient.get().ttp_request("ping", None)


def _start_party(crypten: ModuleType, rank: int, settings: MpcSettings, inq: Any, outq: Any, device: str) -> Party:
    from secure.mpc.runtime import link_keys

    comm = crypten.communicator.get()
    # the parties' own session key: proves each holds the party link's credential, authenticates the direct link
    peer_key = link_keys.agree_over_gloo(rank, 1 - rank, settings.link_secret(rank, 1 - rank), "party0-party1")
    protocol = build_protocol(crypten, rank, settings, device)
    cls = Leader if rank == 0 else Follower
    party = cls(rank, settings, protocol, JobRunner(comm, protocol), inq, outq, device, comm.main_group)
    party.hello()
    _open_peer_link(rank, settings, protocol, peer_key)
    return party


def party_main(rank: int, settings_data: dict[str, Any], generation: int, inq: Any, outq: Any) -> None:
    """Entry point of a party worker process (multiprocessing target: forked warm, ``warm.py``)."""
    die_with_parent()
    stage = "rendezvous"
    try:
        settings = MpcSettings(**settings_data)
        device = resolve_device(settings.device)
        crypten = init_crypten(rank, settings)
        stage = "session"
        party = _start_party(crypten, rank, settings, inq, outq, device)
        outq.put(Up(generation, device))
        party.run(_ping_dealer if settings.provider == "TTP" else None)
        outq.put(Down("stopped"))
        exit_now(outq, 0)
    except BaseException as exc:  # noqa: BLE001 - any failure ends this generation
        outq.put(Down(f"{stage} failed: {type(exc).__name__}: {str(exc)[:500]}"))
        exit_now(outq, 3)
