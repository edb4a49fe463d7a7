"""Per-generation worker processes: one CrypTen/gloo session of a party (rank 0/1) or of the dealer (rank 2).

A worker joins the 3-process gloo group (2 with the test-only TFP provider), serves until anything goes
wrong (peer died, timeout, rendezvous failed), then exits; its supervisor (``MpcEngine`` or ``run_dealer``)
starts a fresh one — a new "generation" — so a broken gloo group is never reused. Workers die with their
supervisor (PR_SET_PDEATHSIG + a parent watchdog), so a SIGKILLed party takes its gloo sockets with it.

Control plane inside the group (party 0 leads):
* idle: party 0 broadcasts {"t": "hb"} to party 1 and pings the dealer every heartbeat period, so silent
  peers are detected by the gloo timeout (op_timeout_s) even with no traffic;
* job: party 0 broadcasts {"t": "job", id, n, d, digest}; party 1 waits up to pair_wait_s for the same job id
  from its own supervisor; both all-reduce(MIN) an "I have it and it matches" flag; both run it or both skip.

Engine <-> worker messages (multiprocessing queues):
  in:  ("job", payload dict) | ("cancel", job_id) | ("stop",)
  out: ("up", generation, device) | ("done", job_id, share) | ("fail", job_id, reason) | ("down", reason)
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import queue
import signal
import sys
import threading
import time
from datetime import timedelta
from typing import Any

import numpy as np

from .protocol import threshold_raw
from .settings import DEALER

PROTOCOL_VERSION = 5  # 3: dealer-bits comparison; 4: public labels at level 1; 5: AES-CTR TTP streams from
# authenticated X25519 session keys, the query gate (compare.query_ok)


# ----------------------------------------------------------------------------------------------- process
def _die_with_parent() -> None:
    """SIGKILL this process when its parent dies (Linux), plus a watchdog thread as a fallback."""
    parent = os.getppid()
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the watchdog still works
        pass
    if os.getppid() != parent:
        os._exit(70)

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(70)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def _exit(outq: Any, code: int) -> None:
    """Flush the out-queue and leave without running destructors (a broken gloo group can hang them)."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        if outq is not None:
            outq.close()
            outq.join_thread()
    finally:
        os._exit(code)


def resolve_device(choice: str) -> str:
    import torch

    if choice == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("PRIVFACE_MPC_DEVICE=cuda but torch sees no GPU")
        return "cuda"
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu"


def init_crypten(rank: int, settings: Any):  # type: ignore[no-untyped-def]
    """crypten.init() for ``rank`` with our rendezvous store and gloo timeouts; returns the crypten module."""
    from .settings import tfp_allowed

    threads = int(getattr(settings, "torch_threads", 0) or 0)
    if threads:
        import torch

        torch.set_num_threads(threads)

    if settings.provider == "TFP" and not tfp_allowed():  # defence in depth (the settings validator also checks)
        raise RuntimeError("provider TFP refused outside PRIVFACE_ENV=test")
    settings.check_transport(rank)
    parties = 2
    os.environ.update({"DISTRIBUTED_BACKEND": "gloo", "WORLD_SIZE": str(parties), "RANK": str(rank),
                       "RENDEZVOUS": f"tcp://{settings.master_addr}:{settings.master_port}"})
    if settings.gloo_ifname:
        os.environ["GLOO_SOCKET_IFNAME"] = settings.gloo_ifname

    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    from .crypten_compat import load_crypten

    op_timeout = timedelta(seconds=float(settings.op_timeout_s))
    connect_timeout = timedelta(seconds=float(settings.connect_timeout_s))
    # new_group() (CrypTen makes three) takes the module default; init_process_group gets it explicitly.
    c10d.default_pg_timeout = op_timeout
    original = dist.init_process_group

    def init_process_group(backend=None, init_method=None, world_size=-1, rank=-1, **kwargs):  # noqa: ANN001
        store = dist.TCPStore(settings.master_addr, int(settings.master_port), world_size, rank == 0,
                              timeout=connect_timeout, wait_for_workers=False)
        return original(backend=backend, store=store, world_size=world_size, rank=rank, timeout=op_timeout)

    dist.init_process_group = init_process_group
    crypten = load_crypten()  # with CrypTen's randomness routed through AES-CTR (crypten_rng.py)
    if rank != DEALER:
        from . import crypten_rng

        crypten_rng.configure(settings.link_secret(rank, DEALER))
    crypten.cfg.mpc.provider = settings.provider
    crypten.cfg.communicator.verbose = True  # per-job traffic stats (bytes, rounds) for the benchmarks
    crypten.init()
    return crypten


def job_digest(kind: str, n: int, d: int, threshold: float, labels: np.ndarray, device: str, batch: int = 0) -> str:
    """``batch``: 0 for one query, Q for a batch of Q queries (identify)."""
    h = hashlib.sha256()
    head = [kind, int(n), int(d), float(threshold).hex(), device] + ([int(batch)] if batch else [])
    h.update(json.dumps(head).encode())
    h.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
    return h.hexdigest()


COALESCE_WAIT_S = 0.05  # how long party 1 waits for the other members of a group party 0 announced


def coalescible(first: dict, other: dict) -> bool:
    """Two queued jobs may run as one batched MPC job: single-query identify (or a shard's identify-best) jobs on
    the very same resident gallery snapshot (the same array object, see ``handle``), threshold and labels."""
    return (first["kind"] == other["kind"] and first["kind"] in ("identify", "identify-best")
            and np.ndim(first["query_share"]) == 1 and np.ndim(other["query_share"]) == 1
            and other["gallery_share"] is first["gallery_share"] and other["threshold"] == first["threshold"]
            and (other["labels"] is first["labels"] or np.array_equal(other["labels"], first["labels"])))


def combined_job(group: list[dict]) -> dict:
    """One job for a group of coalescible jobs: their queries stacked as a batch, answered per member."""
    if len(group) == 1:
        return group[0]
    job = dict(group[0])
    job["query_share"] = np.stack([np.asarray(x["query_share"]) for x in group])
    job["members"] = [x["job_id"] for x in group]
    return job


# ----------------------------------------------------------------------------------------------- parties
class _Party:
    def __init__(self, rank: int, settings: Any, generation: int, inq: Any, outq: Any, device: str) -> None:
        import torch
        import torch.distributed as dist

        from .crypten_compat import load_crypten

        self.torch, self.dist = torch, dist
        self.crypten = load_crypten()
        self.comm = self.crypten.communicator.get()
        self.rank, self.settings, self.generation = rank, settings, generation
        self.inq, self.outq, self.device = inq, outq, device
        self.ttp = settings.provider == "TTP"
        self.hb = settings.effective_heartbeat_s()
        self.pair_wait = settings.effective_pair_wait_s()
        self.jobs: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self.stopping = False
        self.last_gallery: np.ndarray | None = None  # resident snapshot: the engine omits an unchanged gallery
        self.last_labels: np.ndarray | None = None   # ... and its labels
        # True once an identify job has keyed the fixed-gallery cache on the CURRENT resident snapshot (a verify
        # job may have made another snapshot resident in between): only then may the row keys be reused
        self.fg_rows_current = False
        self.protocol = getattr(settings, "protocol", "naive")
        self.fg_cache = None
        if self.protocol == "fixed-gallery" and not self.ttp:
            self.protocol = "naive"  # test-only TFP has no dealer to hold the masks
        if self.protocol == "fixed-gallery":
            from .fixed_gallery import PartyGalleryCache

            self.fg_cache = PartyGalleryCache(rank, device=device)
        self.compare = getattr(settings, "compare", "crypten") if self.ttp else "crypten"
        self.cmp_key: bytes | None = None
        self.cmp_jobs = 0  # stream id of the comparison PRG: one per job, same order at both parties
        if self.ttp:  # the comparison's key: derived from this session's key with the dealer (prg.py)
            from . import crypten_rng, prg

            self.cmp_key = prg.derive_key(crypten_rng.session_key(), prg.PURPOSE_COMPARE)
        # the parties' own session key (link_keys.py): proves each holds the party link's credential, and
        # authenticates the direct comparison link
        from . import link_keys

        self.peer_key = link_keys.agree_over_gloo(rank, 1 - rank, settings.link_secret(rank, 1 - rank),
                                                  "party0-party1")

    # -- group messaging (JSON over uint8 tensors, no pickle)
    def bcast(self, obj: Any = None) -> Any:
        torch, dist, group = self.torch, self.dist, self.comm.main_group
        if self.rank == 0:
            data = json.dumps(obj).encode()
            dist.broadcast(torch.tensor([len(data)], dtype=torch.long), 0, group=group)
            dist.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8), 0, group=group)
            return obj
        size = torch.zeros(1, dtype=torch.long)
        dist.broadcast(size, 0, group=group)
        buf = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.broadcast(buf, 0, group=group)
        return json.loads(bytes(buf.numpy()).decode())

    def agree(self, ok: bool) -> bool:
        flag = self.torch.tensor([1 if ok else 0], dtype=self.torch.long)
        self.dist.all_reduce(flag, op=self.dist.ReduceOp.MIN, group=self.comm.main_group)
        return bool(flag.item())

    def hello(self) -> None:
        """Check that both parties run the same protocol version on the same device type."""
        mine = {"t": "hello", "proto": PROTOCOL_VERSION, "device": self.device, "scores": self.protocol,
                "compare": self.compare}
        theirs = self.bcast(mine if self.rank == 0 else None)
        ok = theirs == mine
        if not self.agree(ok):
            raise RuntimeError(f"parties disagree on protocol/device: party 0 {theirs}, this party {mine}"
                               if self.rank == 1 else "party 1 runs another protocol version or device type")

    def open_peer_link(self) -> None:
        """The direct party-to-party socket of the dealer-bits comparison (``peer_link.py``); after hello(), so
        both parties are known to want it."""
        self.peer_link = None
        if self.compare == "dealer-bits":
            from .peer_link import open_link

            self.peer_link = open_link(self.rank, self.settings.master_addr, self.settings.connect_timeout_s,
                                       self.settings.op_timeout_s, self.peer_key)

    def ping_dealer(self) -> None:
        from crypten.mpc.provider.ttp_provider import TTPClient

        TTPClient.get().ttp_request("ping", None)

    # -- local queue
    def handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "job":
            payload = msg[1]
            payload["arrived"] = time.monotonic()
            if payload.get("same_gallery"):  # resolved in queue order, so it is the snapshot sent just before
                if self.last_gallery is None:
                    self.outq.put(("fail", payload["job_id"], "no resident gallery snapshot"))
                    return
                payload["gallery_share"], payload["labels"] = self.last_gallery, self.last_labels
                payload["resident"] = True
            elif payload["kind"] != "merge":
                self.last_gallery, self.last_labels = payload["gallery_share"], payload["labels"]
                self.fg_rows_current = False  # a new resident snapshot: the cache's last rows are not its rows
            self.on_job(payload)
        elif kind == "forget":  # a delete committed at this party (MpcEngine.forget_rows)
            self.last_gallery = self.last_labels = None
            self.fg_rows_current = False
            if self.fg_cache is not None:
                self.fg_cache.forget()
        elif kind == "cancel":
            self.jobs.pop(msg[1], None)
        elif kind == "stop":
            self.stopping = True

    def on_job(self, payload: dict) -> None:
        self.jobs[payload["job_id"]] = payload

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

    def take_group(self, limit: int) -> list[dict]:
        """Pop the oldest job and up to ``limit`` - 1 coalescible jobs queued right behind it (queue order is
        kept: a job of another kind or gallery ends the group)."""
        _, first = self.jobs.popitem(last=False)
        group = [first]
        while len(group) < limit and self.jobs:
            job_id, nxt = next(iter(self.jobs.items()))
            if not coalescible(first, nxt):
                break
            group.append(self.jobs.pop(job_id))
        return group

    def digest(self, p: dict) -> str:
        g, q = p["gallery_share"], p["query_share"]
        return job_digest(p["kind"], g.shape[0], g.shape[1], p["threshold"], p["labels"], self.device,
                          int(q.shape[0]) if q.ndim == 2 else 0)

    def run_job(self, p: dict) -> None:
        from .protocol import match_share

        if p["kind"] in ("identify-best", "merge") and self.compare != "dealer-bits":
            self.fail(p, f"{p['kind']} jobs need PRIVFACE_MPC_COMPARE=dealer-bits (and TTP)")
            return
        score_fn = None
        if self.fg_cache is not None and p["kind"] in ("identify", "identify-best"):
            from .fixed_gallery import party_scores

            def score_fn(q, g, lab):  # type: ignore[no-untyped-def]
                out = party_scores(self.crypten, self.fg_cache, q, g, lab, mod38=self.compare == "dealer-bits",
                                   prefetch=prefetch() if prefetch else None, after_dealer=request,
                                   same_rows=bool(p.get("resident")) and self.fg_rows_current)
                self.fg_rows_current = True
                return out

        channel, compare_fn, request, prefetch = None, None, None, None
        if self.compare == "dealer-bits":
            from .compare import PeerChannel

            channel = PeerChannel(self.rank, self.peer_link)
            q = p["query_share"]
            batch = int(q.shape[0]) if q.ndim == 2 else 0
            if p["kind"] == "merge":
                batch = int(p["gallery_share"].shape[1]) // 2
            gate = None if p["kind"] == "merge" else np.asarray(q, dtype=np.int64).reshape(max(batch, 1), -1)
            compare_fn, request, prefetch = self._compare_fn(p["kind"], np.asarray(p["labels"], dtype=np.int64),
                                                             int(p["gallery_share"].shape[0]), batch, channel, gate)

        self.comm.reset_communication_stats()
        self.timings: dict[str, float] = {}
        t0, cpu0 = time.perf_counter(), time.process_time()
        try:
            if p["kind"] == "merge":  # no scores to compute: the "gallery" rows are shard winners' shares
                share = [int(v) for v in compare_fn(p["gallery_share"].view(np.uint64), threshold_raw(p["threshold"]))
                         .view(np.int64).tolist()]
            else:
                share = match_share(p["kind"], p["query_share"], p["gallery_share"], p["labels"], p["threshold"],
                                    self.device, score_fn=score_fn, compare_fn=compare_fn)
        except BaseException as exc:
            # "down" first: by the time the caller sees its job fail, status() already says disconnected
            reason = f"session failed: {type(exc).__name__}: {str(exc)[:500]}"
            self.outq.put(("down", reason))
            self.fail(p, f"MPC failed, peer or dealer lost ({reason})")
            raise
        st = self.comm.get_communication_stats()
        stats = {"bytes": int(st["bytes"]) + (channel.bytes if channel else 0),
                 "rounds": int(st["rounds"]) + (channel.rounds if channel else 0),
                 "comm_s": float(st["time"]), "mpc_s": time.perf_counter() - t0,
                 "cpu_s": time.process_time() - cpu0,  # this process's CPU time in the job (all its threads)
                 "queued_s": t0 - p.get("arrived", t0),  # waited in this worker's queue (the group's oldest job)
                 "protocol": self.protocol if score_fn else "naive", "compare": self.compare,
                 "setup_rows": int(self.fg_cache.setup_rows) if score_fn else 0, **self.timings,
                 **(self.fg_cache.timings if score_fn else {})}
        members = p.get("members")
        if members is None:
            self.outq.put(("done", p["job_id"], share, stats))
            return
        stats["coalesced"] = len(members)  # one batched job answered these queries; stats are the whole job's
        q = len(members)
        if p["kind"] == "identify-best":  # a batch answers [Q scores, Q labels]; one query answers [score, label]
            share = [[share[i], share[q + i]] for i in range(q)]
        for job_id, member_share in zip(members, share):
            self.outq.put(("done", job_id, member_share, stats))

    def fail(self, p: dict, reason: str) -> None:
        """Report a job failed (every member of a coalesced one)."""
        for job_id in p.get("members") or [p["job_id"]]:
            self.outq.put(("fail", job_id, reason))

    def _compare_fn(self, kind: str, labels: np.ndarray, rows: int, batch: int, channel: Any,  # type: ignore[no-untyped-def]
                    gate: np.ndarray | None = None):
        """The dealer-bits comparison for one job: (run, request, prefetch).

        ``prefetch()`` gives the arguments the fixed-gallery score request carries so that the dealer starts
        computing this job's corrections right away, beside the score randomness. ``request()`` makes party 0
        ask the dealer for its corrections without waiting (the score step calls it as soon as its own dealer
        answer is in): a collect if they were prefetched, else a full request. ``run`` collects them (asking
        first if nobody did), draws this party's PRG fields and runs the online rounds. ``gate``: this party's
        query shares [Q, d]; the output is then multiplied by [the query is at most a unit vector]
        (``compare.query_ok``)."""
        from . import compare, correlations, dealer_client
        from .prg import AesCtrStream

        self.cmp_jobs += 1
        stream_id = self.cmp_jobs
        dim = 0 if gate is None else int(gate.shape[1])
        plan = correlations.match_plan(kind, rows, batch, dim)
        asked, prefetched = [False], [False]

        def prefetch() -> tuple:
            prefetched[0] = True
            return (kind, rows, batch, stream_id, dim)

        def request() -> None:
            if self.rank == 0 and not asked[0]:
                if prefetched[0]:
                    dealer_client.send_request("cmp_collect", stream_id)
                else:
                    dealer_client.send_request("cmp_corrections", kind, rows, batch, stream_id, dim)
                asked[0] = True

        def run(scores: np.ndarray, t_raw: int) -> np.ndarray:
            t0 = time.perf_counter()
            if kind == "merge":
                request()
            if int(scores.shape[0]) != rows:
                raise RuntimeError("score rows differ from the gallery rows")
            corrections = None
            if self.rank == 0:
                request()
                corrections = dealer_client.receive_result().numpy().view(np.uint64)
            t1 = time.perf_counter()
            src = correlations.PartySource(self.rank, AesCtrStream(self.cmp_key, stream_id), corrections)
            materials = correlations.party_materials(src, plan)
            t2 = time.perf_counter()
            if kind == "merge":
                out = compare.merge(channel, scores, t_raw, materials)
            else:
                out = compare.match(channel, kind, scores, labels, t_raw, materials, query=gate)
            self.timings.update(compare_dealer_s=t1 - t0, compare_draw_s=t2 - t1,
                                compare_online_s=time.perf_counter() - t2)
            return out

        return run, request, prefetch


class _Leader(_Party):
    def run(self) -> None:
        last_hb = time.monotonic()
        alone_next = False  # the peer lacked a member of the last coalesced group: run its first job alone
        while not self.stopping:
            wait = 0.0 if self.jobs else max(0.0, self.hb - (time.monotonic() - last_hb))
            self.poll(wait)
            if self.stopping:
                return
            if self.jobs:
                group = self.take_group(1 if alone_next else int(self.settings.coalesce_max))
                alone_next = False
                job = combined_job(group)
                g = job["gallery_share"]
                self.bcast({"t": "job", "id": job["job_id"], "ids": [x["job_id"] for x in group],
                            "n": int(g.shape[0]), "d": int(g.shape[1]), "digest": self.digest(job)})
                if self.agree(True):
                    self.run_job(job)
                elif len(group) > 1:  # both parties keep the jobs queued; the first is announced alone next
                    for x in reversed(group):
                        self.jobs[x["job_id"]] = x
                        self.jobs.move_to_end(x["job_id"], last=False)
                    alone_next = True
                else:
                    self.fail(job, "the peer party did not submit this job in time (or its parameters differ); "
                                   "skipped by both")
            if time.monotonic() - last_hb >= self.hb:
                self.bcast({"t": "hb"})
                self.agree(True)  # a round trip: a frozen (not just dead) peer is caught by the gloo timeout
                if self.ttp:
                    self.ping_dealer()
                last_hb = time.monotonic()


class _Follower(_Party):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.skipped: collections.OrderedDict[str, None] = collections.OrderedDict()

    def run_group(self, msg: dict) -> None:
        """Party 0 announced a coalesced group: run it if every member is here (after a short wait) and forms
        the same batch; else agree "no" and keep the jobs queued (party 0 then announces the first one alone)."""
        ids = list(msg["ids"])
        deadline = time.monotonic() + min(self.pair_wait, COALESCE_WAIT_S)
        while any(i not in self.jobs for i in ids) and time.monotonic() < deadline:
            self.poll(deadline - time.monotonic())
        group = [self.jobs.get(i) for i in ids]
        ok = all(x is not None and (k == 0 or coalescible(group[0], x)) for k, x in enumerate(group))
        job = combined_job(group) if ok else None  # type: ignore[arg-type]
        if self.agree(ok and job is not None and self.digest(job) == msg.get("digest")):
            for i in ids:
                self.jobs.pop(i, None)
            self.run_job(job)  # type: ignore[arg-type]

    def on_job(self, payload: dict) -> None:
        if payload["job_id"] in self.skipped:
            self.outq.put(("fail", payload["job_id"], "party 0 already announced this job and it was skipped"))
            return
        self.jobs[payload["job_id"]] = payload

    def run(self) -> None:
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
            jid = msg["id"]
            deadline = time.monotonic() + self.pair_wait
            while jid not in self.jobs and time.monotonic() < deadline:
                self.poll(deadline - time.monotonic())
            if len(msg.get("ids", [jid])) > 1:
                self.run_group(msg)
                continue
            p = self.jobs.pop(jid, None)
            ok = p is not None and self.digest(p) == msg.get("digest")
            if self.agree(ok):
                self.run_job(p)  # type: ignore[arg-type]
            elif p is not None:
                self.outq.put(("fail", jid, "the parties disagree on this job (n, d, kind, threshold or labels)"))
            else:
                self.skipped[jid] = None
                while len(self.skipped) > 1024:
                    self.skipped.popitem(last=False)


def party_main(rank: int, settings_data: dict, generation: int, inq: Any, outq: Any) -> None:
    """Entry point of a party worker process (multiprocessing 'spawn' target)."""
    _die_with_parent()
    from .settings import MpcSettings

    stage = "rendezvous"
    try:
        settings = MpcSettings(**settings_data)
        device = resolve_device(settings.device)
        init_crypten(rank, settings)
        stage = "session"
        party = (_Leader if rank == 0 else _Follower)(rank, settings, generation, inq, outq, device)
        party.hello()
        party.open_peer_link()
        outq.put(("up", generation, device))
        party.run()
        outq.put(("down", "stopped"))
        _exit(outq, 0)
    except BaseException as exc:  # noqa: BLE001 - any failure ends this generation
        outq.put(("down", f"{stage} failed: {type(exc).__name__}: {str(exc)[:500]}"))
        _exit(outq, 3)
