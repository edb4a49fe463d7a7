"""Fixed-gallery secure scores: the gallery's Beaver mask is opened once per row and reused by every query.

Ring: Z_2^64 as int64 with wraparound (torch), integer scale, exactly the values of the naive circuit
(gallery and query at 2^16, scores at 2^32; see ``protocol.py``). Security argument: ``docs/security.md``.

Correlated randomness (dealer D = CrypTen TTP, which shares one AES-CTR stream with each party, keyed by the
party-dealer session key; ``crypten_rng.py``):
* mask setup, once per gallery row (and again for a row whose share changed, or after a reset):
  party i draws A_i (m x d) from its PRG; D draws both and keeps A = A_0 + A_1. The parties open
  E = G - A (each sends G_i - A_i once) and cache [E | A_i] per row.
* per query x (shared): party i draws b_i (d) from its PRG; D computes c = A[rows] . (b_0 + b_1) and sends
  c_0 = c - c_1 to party 0 (n elements), party 1 draws c_1 (n) from its PRG. The parties open f = x - b (d).
  Then  share_i(G x) = [i == 0] E f + E b_i + A_i f + c_i          (sum over i: (E + A)(f + b) = G x)
  computed as one product  [E | A_i] . [b_i + [i == 0] f ; f]  + c_i.
Per-query traffic between the parties: 2 d ring elements (f); from the dealer: n (c_0 to party 0).

Rules that keep it secure (each enforced here):
* a mask row is never used to open anything but its own gallery row: a row whose share changes (at either
  party) gets a fresh slot and a fresh mask; slots are never reused (a reset starts a new store);
* b is fresh per query (drawn from the PRG stream, which never repeats within a generation);
* A_i never leaves party i; E is opened once per (row, slot).
"""
from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch

from secure.mpc.dealer import client as dealer_client
from secure.mpc.primitives.ring_matmul import MIN_BATCH, float_matmul, to_float_rows
from secure.mpc.protocols.base import Comparison, JobInputs, ScoreProtocol

SETUP_CHUNK = 1 << 16  # gallery rows masked per step of the set-up (bounds its temporary memory)


def setup_chunks(m: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges of a set-up of m rows; parties and dealer draw their masks chunk by chunk."""
    return [(s, min(m, s + SETUP_CHUNK)) for s in range(0, m, SETUP_CHUNK)]


# multiplier folding the public label into the local row key (odd => a bijection of the ring)
_LABEL_MIX = -7046029254386353131  # 0x9E3779B97F4A7C15 as int64


# ----------------------------------------------------------------------------------- pure ring arithmetic
def ring_score_share(rank: int, ea: torch.Tensor, f: torch.Tensor, b_i: torch.Tensor, c_i: torch.Tensor,
                     ea_float: torch.Tensor | None = None) -> torch.Tensor:
    """Party ``rank``'s share of G x, from ``ea`` = [E | A_i] (n x 2d), public f = x - b, b_i, c_i (int64).

    One query: f, b_i [d], c_i [n] -> [n].  A batch of Q queries: f, b_i [Q, d], c_i [n, Q] -> [n, Q].
    With ``ea_float`` (``ring_matmul.to_float_rows(ea)``, on the CPU or a GPU) the product runs through float64
    BLAS on that device; the share is then only right modulo 2^38 (enough for the dealer-bits comparison, which
    reads 38 bits). The result is always a CPU tensor.
    """
    v = b_i + f if rank == 0 else b_i
    rhs = torch.cat([v, f]) if f.dim() == 1 else torch.cat([v, f], dim=1).t()
    if ea_float is not None:
        return float_matmul(ea_float, rhs).cpu() + c_i
    return int64_product(ea, rhs) + c_i


def int64_product(m: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """m . rhs in Z_2^64 for rhs [K] or [K, Q]; a matrix column by column (torch's int64 matmul has no BLAS
    kernel and is slower than as many int64 matrix-vector products)."""
    if rhs.dim() == 1:
        return torch.mv(m, rhs)
    return torch.stack([torch.mv(m, rhs[:, j]) for j in range(int(rhs.shape[1]))], dim=1)


def uses_floats(device: str, mod38: bool, q_shape: tuple[int, ...]) -> bool:
    """Whether a score product goes through ``ring_matmul`` (both parties and the dealer apply the same rule).

    Only when the comparison reads 38 bits (``mod38``). On a GPU always (CUDA has no int64 matmul, and the
    float64 GEMM is the fast path there); on the CPU for batches of at least MIN_BATCH queries (below that the
    int64 matrix-vector product is faster)."""
    if not mod38:
        return False
    return device != "cpu" or (len(q_shape) == 2 and q_shape[0] >= MIN_BATCH)


def split_rows_to_ranges(slots: torch.Tensor) -> list[list[int]]:
    """Run-length encode a slot vector: [[start, length], ...] (the dealer needs only this, no labels)."""
    n = int(slots.shape[0])
    if n == 0:
        return []
    breaks = torch.nonzero(slots[1:] != slots[:-1] + 1).flatten() + 1   # a new run starts at these rows
    starts = torch.cat([torch.zeros(1, dtype=torch.long), breaks])
    lengths = torch.diff(torch.cat([starts, torch.tensor([n])]))
    return [[int(v), int(ln)] for v, ln in zip(slots[starts].tolist(), lengths.tolist())]


def gather_ranges(store: torch.Tensor, ranges: list[list[int]], dim: int = 0) -> torch.Tensor:
    if len(ranges) == 1:
        start, length = ranges[0]
        return store.narrow(dim, start, length)
    return torch.cat([store.narrow(dim, s, n) for s, n in ranges], dim=dim)


def _extend_floats(floats: torch.Tensor | None, used: int, new_rows: torch.Tensor) -> torch.Tensor | None:
    """The float64 copy of a store after ``new_rows`` were appended at slot ``used``: only the new rows are
    converted (enrollments do not pay for the whole gallery); None while no product has asked for it yet."""
    if floats is None or used == 0:
        return None
    return torch.cat([floats[:used], to_float_rows(new_rows).to(floats.device)])


# ----------------------------------------------------------------------------------- party side
class PartyGalleryCache:
    """One party's cached masks: rows keyed by (public label, a local checksum of this party's share row).

    Lives in the worker process of one generation (the dealer's masks live in its worker of the same
    generation), so a reconnect starts from scratch: rows are masked again with fresh masks.
    """

    def __init__(self, rank: int, max_slots_factor: float = 2.0, device: str = "cpu") -> None:
        self.rank = rank
        self.max_slots_factor = max_slots_factor
        self.device = device                            # where the float64 copy lives and products run
        self.stores: dict[int, torch.Tensor] = {}       # d -> [S, 2d] rows [E | A_i]
        self.used: dict[int, int] = {}                  # d -> S (slots in use)
        self.index: dict[int, dict[int, int]] = {}      # d -> row key -> slot
        self.last: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # d -> (keys, slots) of the last job
        self.weights: dict[int, torch.Tensor] = {}
        self.floats: dict[int, torch.Tensor | None] = {}  # d -> float64 [S, 2d] of the stores (ring_matmul), on demand,
                                                        # on ``device``
        self.setup_rows = 0                             # rows masked by the last call (stats)
        self.timings: dict[str, float] = {}             # seconds per step of the last call (stats)

    def row_keys(self, gallery: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Local, never sent: a random linear checksum of this party's share rows, mixed with the label."""
        d = int(gallery.shape[1])
        w = self.weights.get(d)
        if w is None:
            w = torch.frombuffer(bytearray(os.urandom(8 * d)), dtype=torch.long) | 1  # odd, from the OS CSPRNG
            self.weights[d] = w
        return torch.mv(gallery, w) + labels * _LABEL_MIX

    def forget(self) -> None:
        """Zero every cached row [E | A_i] (E + A_i is another share of the row) and forget their keys, keeping the
        slot counters: slots are never reused, and the next job re-masks its rows in fresh slots (the peer and the
        dealer need not act: a miss here is a miss for both, agreed per job)."""
        for d, store in self.stores.items():
            store.zero_()
            self.index[d] = {}
        self.floats.clear()
        self.last.clear()

    def lookup(self, d: int, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots, hit) for each row: slot -1 / hit False where this party has no mask for the row."""
        last = self.last.get(d)
        if last is not None and last[0].shape == keys.shape and torch.equal(last[0], keys):
            return last[1].clone(), torch.ones(keys.shape[0], dtype=torch.bool)
        idx = self.index.get(d, {})
        slots = torch.tensor([idx.get(k, -1) for k in keys.tolist()], dtype=torch.long)
        return slots, slots >= 0


def party_scores(crypten: Any, cache: PartyGalleryCache, query: torch.Tensor, gallery: torch.Tensor,
                 labels: torch.Tensor, mod38: bool = False, prefetch: tuple[Any, ...] | None = None, after_dealer: Any = None,
                 same_rows: bool = False) -> torch.Tensor:
    """This party's int64 share of G x (scale 2^32) by the fixed-gallery protocol. Both parties call it in lockstep.

    ``query``: [d] (one query -> [n]) or [Q, d] (a batch -> [n, Q]; one dealer request and one opening for all).
    ``mod38``: the caller reads the scores modulo 2^38 only, so a batch may use ``ring_matmul`` (both parties
    and the dealer must agree: it is part of the dealer request). ``prefetch`` rides along with that request
    (the job's comparison: the dealer prepares its corrections meanwhile). ``after_dealer()`` runs right after
    this job's dealer answer is collected (the worker uses it to send its next dealer request early). Party 0
    has at most one request outstanding: gloo sends block until the peer receives, so two would deadlock.
    ``same_rows``: the gallery is the very snapshot of this worker's previous identify job (the engine's
    resident-gallery marker), so its row keys and slots are reused without recomputing the checksums.
    """
    import torch.distributed as dist
    from crypten.common.rng import generate_random_ring_element
    from crypten.mpc.provider.ttp_provider import TTPClient

    comm = crypten.communicator.get()
    rank = comm.get_rank()
    n, d = int(gallery.shape[0]), int(gallery.shape[1])
    gen = TTPClient.get().get_generator(device="cpu")
    ttp = TTPClient.get()

    t0 = time.perf_counter()
    last = cache.last.get(d)
    if same_rows and last is not None and last[1].shape[0] == n:
        keys, slots, hit = last[0], last[1].clone(), torch.ones(n, dtype=torch.bool)
    else:
        keys = cache.row_keys(gallery, labels)
        slots, hit = cache.lookup(d, keys)
    # agree on which rows both parties already hold a mask for (a row is reused only if BOTH shares are unchanged)
    all_hit = torch.tensor([1 if bool(hit.all()) else 0], dtype=torch.long)
    dist.all_reduce(all_hit, op=dist.ReduceOp.MIN, group=comm.main_group)
    cache.setup_rows = 0
    if not int(all_hit.item()):
        h = hit.to(torch.long)
        dist.all_reduce(h, op=dist.ReduceOp.MIN, group=comm.main_group)
        both = h.bool() & hit
        miss = ~both
        m = int(miss.sum().item())
        used = cache.used.get(d, 0)
        if used + m > max(int(cache.max_slots_factor * n), n + 4096):  # identical decision at both parties
            if rank == 0:
                ttp.ttp_request("fg_reset", "cpu", d)
            cache.stores.pop(d, None)
            cache.index[d] = {}
            used, miss, m = 0, torch.ones(n, dtype=torch.bool), n
            slots = torch.full((n,), -1, dtype=torch.long)
        # fresh masks for the missing rows: A_i from this party's PRG stream; the dealer draws both and keeps A.
        # In chunks of SETUP_CHUNK rows (the dealer draws in the same chunks): bounded temporary memory.
        if rank == 0:
            ttp.ttp_request("fg_mask", "cpu", m, d)
        miss_rows = torch.nonzero(miss).flatten()
        new_rows = torch.empty(m, 2 * d, dtype=torch.long)
        for start, stop in setup_chunks(m):
            a_i = generate_random_ring_element((stop - start, d), generator=gen, device="cpu")
            new_rows[start:stop, :d] = comm.all_reduce(gallery[miss_rows[start:stop]] - a_i)  # E = G - A, opened once
            new_rows[start:stop, d:] = a_i
        store = cache.stores.get(d)
        cache.stores[d] = new_rows if store is None or used == 0 else torch.cat([store[:used], new_rows])
        cache.floats[d] = _extend_floats(cache.floats.get(d), used, new_rows)
        new_slots = torch.arange(used, used + m, dtype=torch.long)
        slots[miss] = new_slots
        idx = cache.index.setdefault(d, {})
        for k, s in zip(keys[miss].tolist(), new_slots.tolist()):
            idx[k] = s
        cache.used[d] = used + m
        cache.setup_rows = m
    cache.last[d] = (keys, slots.clone())

    t1 = time.perf_counter()
    ranges = split_rows_to_ranges(slots)
    q_shape = tuple(query.shape)  # (d,) or (Q, d)
    use_floats = uses_floats(cache.device, mod38, q_shape)
    b_i = generate_random_ring_element(q_shape, generator=gen, device="cpu")
    c_shape = (n,) if len(q_shape) == 1 else (n, q_shape[0])
    if rank == 0:  # the dealer computes c = A b while the parties open f and compute their own products
        dealer_client.send_request("fg_query", ranges, d, q_shape[0] if len(q_shape) == 2 else 0,
                                   use_floats, prefetch)
        c_i = None
    else:
        c_i = generate_random_ring_element(c_shape, generator=gen, device="cpu")
    t2 = time.perf_counter()
    f = query - b_i
    f = comm.all_reduce(f)  # f = x - b, opened (b fresh and uniform)
    ea = gather_ranges(cache.stores[d], ranges)
    ea_float = None
    if use_floats:
        floats = cache.floats.get(d)
        if floats is None:
            floats = cache.floats[d] = to_float_rows(cache.stores[d]).to(cache.device)
        ea_float = gather_ranges(floats, ranges)
    t3 = time.perf_counter()
    out = ring_score_share(rank, ea, f, b_i, torch.zeros((), dtype=torch.long), ea_float)
    t4 = time.perf_counter()
    out += c_i if c_i is not None else dealer_client.receive_result().reshape(c_shape)
    if after_dealer is not None:  # only now: a gloo send to the dealer blocks while the dealer is sending to us
        after_dealer()
    cache.timings = {"score_cache_s": t1 - t0, "score_request_s": t2 - t1, "score_open_s": t3 - t2,
                     "score_local_s": t4 - t3, "score_dealer_wait_s": time.perf_counter() - t4}
    return out


class FixedGalleryScores(ScoreProtocol):
    """The fixed-gallery score step of identify jobs (``PRIVFACE_MPC_PROTOCOL=fixed-gallery``, the default, with TTP).

    ``mod38``: the comparison reads the scores modulo 2^38 only (dealer-bits), so batches may use ``ring_matmul``.
    """

    name = "fixed-gallery"

    def __init__(self, crypten: Any, rank: int, device: str = "cpu", mod38: bool = False) -> None:
        self.crypten, self.mod38 = crypten, mod38
        self.cache = PartyGalleryCache(rank, device=device)
        # True once a job has keyed the cache on the CURRENT resident snapshot (a verify job may have made another
        # snapshot resident in between): only then may the row keys be reused
        self.rows_current = False

    def scores(self, job: JobInputs, comparison: Comparison) -> torch.Tensor:
        query = torch.from_numpy(np.ascontiguousarray(job.query, dtype=np.int64).copy())
        gallery = torch.from_numpy(np.ascontiguousarray(job.gallery, dtype=np.int64))  # only read
        labels = torch.as_tensor(np.asarray(job.labels, dtype=np.int64).copy())
        out = party_scores(self.crypten, self.cache, query, gallery, labels, mod38=self.mod38,
                           prefetch=comparison.prefetch(), after_dealer=comparison.request,
                           same_rows=job.resident and self.rows_current)
        self.rows_current = True
        return out

    def stats(self) -> dict[str, Any]:
        return {"setup_rows": int(self.cache.setup_rows), **self.cache.timings}

    def new_snapshot(self) -> None:
        self.rows_current = False

    def forget(self) -> None:
        self.rows_current = False
        self.cache.forget()


# ----------------------------------------------------------------------------------- dealer side
class DealerGalleryMasks:
    """The dealer's half: it knows A (the sum of both parties' PRG draws) per slot; never any data."""

    def __init__(self, device: str = "cpu") -> None:
        self.stores: dict[int, torch.Tensor] = {}
        self.used: dict[int, int] = {}
        self.floats: dict[int, torch.Tensor | None] = {}
        self.device = device  # where the float64 copy lives and products run (the parties' rule: uses_floats)

    def reset(self, d: int) -> None:
        self.stores.pop(d, None)
        self.floats.pop(d, None)
        self.used[d] = 0

    def add(self, gens: list[Any], m: int, d: int) -> None:
        from crypten.common.rng import generate_random_ring_element

        a = torch.empty(m, d, dtype=torch.long)
        for start, stop in setup_chunks(m):  # same chunks, order and sizes as the parties' draws
            a[start:stop] = 0
            for g in gens:
                a[start:stop] += generate_random_ring_element((stop - start, d), generator=g, device=g.device)
        used = self.used.get(d, 0)
        store = self.stores.get(d)
        self.stores[d] = a if store is None or used == 0 else torch.cat([store[:used], a])
        self.floats[d] = _extend_floats(self.floats.get(d), used, a)
        self.used[d] = used + m

    def query(self, gens: list[Any], ranges: list[list[int]], d: int, batch: int = 0,
              use_floats: bool = False) -> torch.Tensor:
        """c0 = A[rows] b - c1 for fresh b ([d], or [batch, d] when batch > 0); ``use_floats``: A b only mod 2^38,
        through ``ring_matmul`` on this dealer's device."""
        b_shape = (d,) if batch <= 0 else (batch, d)
        b = _summed_draws(gens, b_shape)
        used = self.used.get(d, 0)
        n = 0
        for s, ln in ranges:
            if s < 0 or ln < 1 or s + ln > used:
                raise RuntimeError("fixed-gallery query names a slot the dealer does not hold")
            n += ln
        if use_floats:
            floats = self.floats.get(d)
            if floats is None:
                floats = self.floats[d] = to_float_rows(self.stores[d]).to(self.device)
            c = float_matmul(gather_ranges(floats, ranges), b if batch <= 0 else b.t()).cpu()
        else:
            rows = gather_ranges(self.stores[d], ranges)
            c = int64_product(rows, b if batch <= 0 else b.t())
        result: torch.Tensor = c - _summed_draws(gens[1:], tuple(c.shape))
        return result


def _summed_draws(gens: list[Any], shape: tuple[int, ...]) -> torch.Tensor:
    """The sum of one ring element of ``shape`` drawn from each generator, in order."""
    from crypten.common.rng import generate_random_ring_element

    draws = [generate_random_ring_element(shape, generator=g, device=g.device) for g in gens]
    total: torch.Tensor = draws[0]
    for part in draws[1:]:
        total = total + part
    return total
