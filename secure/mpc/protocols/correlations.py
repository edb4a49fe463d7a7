"""Correlated randomness of the comparison protocol (``compare.py``): what the dealer prepares per job.

Each party shares an AES-CTR PRG with the dealer (``prg.py``). Every random field of a job is either
* "both": each party draws its own share from its PRG (the dealer draws both and knows the sum), or
* "p1":   party 1 draws its share from its PRG; party 0's share is computed by the dealer from everything else
  and sent to party 0 (the only dealer -> party traffic: the ``corrections`` array).
So the dealer never sees data, party 1 never hears from the dealer after the key exchange, and party 0
receives one array per job. Both sides walk the same ``match_plan`` in the same order.

Per comparison of E values (each |y| < 2^(N_BITS-1)), W = ceil(E / 64) words:
  r_arith  [E]    both   additive shares of r mod 2^N_BITS (masks the opened value)
  r_bits   [N, W] p1     XOR shares of r's bits, bit-sliced
  pair_and [F, W] p1     XOR shares of r_(2i+1) & r_(2i), F = FIRST_PAIRS: the borrow tree's first level is then
                         local (c is public, so its AND gates are linear in r's bits and these products)
  per later level of the borrow tree with p pairs: a, b1, b2 [3, p, W] both; c1 = a&b1, c2 = a&b2 [2, p, W] p1
Per selection (bit -> arithmetic, times V values) of E elements:
  rho_bits [W] both (XOR shares of a random bit rho); rho_arith [E] p1 (additive shares of rho);
  b [V, E] both (masks of the values); rho_b [V, E] p1 (additive shares of rho * b).
Per squaring of E values (the query gate, ``compare.query_ok``): s [E] both (additive shares of a random s),
  s2 [E] p1 (additive shares of s * s).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from secure.mpc.primitives.bits import bitslice, n_words, tree_pairs, unbitslice
from secure.mpc.primitives.prg import AesCtrStream

N_BITS = 38             # compared values are differences of scores at scale 2^32: |y| < 2^37 (norms <= 4 each)
LOW_BITS = N_BITS - 1
FIRST_PAIRS = LOW_BITS // 2   # bit pairs of the borrow tree's first level (computed locally)
LATER_WIDTH = LOW_BITS - FIRST_PAIRS  # positions entering the second level
MASK = np.uint64((1 << N_BITS) - 1)
MAX_ROWS = 1 << 24      # largest gallery a dealer request may name
MAX_BATCH = 4096
MAX_DIM = 4096
GATE_BLOCK = 16         # the query gate sums squares in blocks of 16 coordinates (each block < 2^36)


def gate_width(dim: int) -> int:
    """Comparisons per query in the gate: 2 per coordinate (|q_i| <= 1), one per block and one for the norm."""
    return 2 * dim + -(-dim // GATE_BLOCK) + 1


@dataclass(frozen=True)
class Sq:
    size: int


@dataclass(frozen=True)
class Cmp:
    size: int


@dataclass(frozen=True)
class Mux:
    size: int
    values: int


PLAN_KINDS = ("verify", "identify", "identify-best", "merge")


def match_plan(kind: str, rows: int, batch: int, dim: int = 0) -> list[Cmp | Mux | Sq]:
    """The comparisons and selections of one job (see ``compare.match`` / ``compare.merge``): a knockout over
    ``rows`` for each of ``max(batch, 1)`` queries, then the threshold (not for identify-best). identify,
    identify-best and merge carry (score, label), except identify's first level (public labels); verify only
    the score. ``dim`` > 0 (not for merge): the query gate (``compare.query_ok``) first, its output gating last."""
    if kind not in PLAN_KINDS:
        raise ValueError(f"unknown job kind {kind!r}")
    if not 1 <= rows <= MAX_ROWS or not 0 <= batch <= MAX_BATCH or not 0 <= dim <= MAX_DIM:
        raise ValueError("job size out of range")
    if dim and kind == "merge":
        raise ValueError("a merge job has no query to gate")
    q = max(int(batch), 1)
    carried = 1 if kind == "verify" else 2
    steps: list[Cmp | Mux | Sq] = []
    if dim:
        k = q * gate_width(dim)
        steps += [Sq(q * dim), Cmp(k), Mux(k, 0), Cmp(q)]
    m = int(rows)
    first = True
    while m > 1:
        h = m // 2
        # identify's first level: the labels are still public, only the score is selected (compare.knockout)
        steps += [Cmp(h * q), Mux(h * q, 1 if first and kind in ("identify", "identify-best") else carried)]
        m = h + m % 2
        first = False
    if kind != "identify-best":
        steps += [Cmp(q), Mux(q, 0 if kind == "verify" else 1)]
    if dim:
        steps += [Mux(q, 1)]  # output (or identify-best's label) times the gate bit
    return steps


# ----------------------------------------------------------------------------------------------- party side
@dataclass
class Triples:
    a: np.ndarray
    b1: np.ndarray
    b2: np.ndarray
    c1: np.ndarray
    c2: np.ndarray


@dataclass
class CmpMaterial:
    r_arith: np.ndarray
    r_bits: np.ndarray
    pair_and: np.ndarray
    triples: list[Triples]


@dataclass
class MuxMaterial:
    rho_bits: np.ndarray
    rho_arith: np.ndarray
    b: np.ndarray
    rho_b: np.ndarray


class PartySource:
    """One party's fields: "both" from its own stream, "p1" from its stream (party 1) or the corrections (party 0)."""

    def __init__(self, rank: int, stream: AesCtrStream, corrections: np.ndarray | None = None) -> None:
        if rank == 0 and corrections is None:
            raise ValueError("party 0 needs the dealer's corrections")
        self.rank, self.stream = rank, stream
        self.corrections = corrections
        self.used = 0

    def both(self, count: int) -> np.ndarray:
        return self.stream.u64(count)

    def p1(self, count: int) -> np.ndarray:
        if self.rank == 1:
            return self.stream.u64(count)
        assert self.corrections is not None
        if self.used + count > self.corrections.shape[0]:
            raise RuntimeError("dealer corrections shorter than the job plan")
        out = self.corrections[self.used:self.used + count]
        self.used += count
        return out

    def finish(self) -> None:
        if self.corrections is not None and self.used != self.corrections.shape[0]:  # party 0 (its constructor)
            raise RuntimeError("dealer corrections longer than the job plan")


def draw_cmp(src: PartySource, size: int) -> CmpMaterial:
    w = n_words(size)
    r_arith = src.both(size) & MASK
    r_bits = src.p1(N_BITS * w).reshape(N_BITS, w)
    pair_and = src.p1(FIRST_PAIRS * w).reshape(FIRST_PAIRS, w)
    triples = []
    for p in tree_pairs(LATER_WIDTH):
        abb = src.both(3 * p * w).reshape(3, p, w)
        cc = src.p1(2 * p * w).reshape(2, p, w)
        triples.append(Triples(abb[0], abb[1], abb[2], cc[0], cc[1]))
    return CmpMaterial(r_arith, r_bits, pair_and, triples)


def draw_mux(src: PartySource, size: int, values: int) -> MuxMaterial:
    rho_bits = src.both(n_words(size))
    rho_arith = src.p1(size)
    b = src.both(values * size).reshape(values, size)
    rho_b = src.p1(values * size).reshape(values, size)
    return MuxMaterial(rho_bits, rho_arith, b, rho_b)


@dataclass
class SqMaterial:
    s: np.ndarray
    s2: np.ndarray


def draw_sq(src: PartySource, size: int) -> SqMaterial:
    return SqMaterial(src.both(size), src.p1(size))


def party_materials(src: PartySource, plan: list[Cmp | Mux | Sq]) -> list[CmpMaterial | MuxMaterial | SqMaterial]:
    out: list[CmpMaterial | MuxMaterial | SqMaterial] = []
    for step in plan:
        if isinstance(step, Cmp):
            out.append(draw_cmp(src, step.size))
        elif isinstance(step, Mux):
            out.append(draw_mux(src, step.size, step.values))
        else:
            out.append(draw_sq(src, step.size))
    src.finish()
    return out


# ----------------------------------------------------------------------------------------------- dealer side
def dealer_corrections(key0: bytes, key1: bytes, stream_id: int, plan: list[Cmp | Mux | Sq]) -> np.ndarray:
    """Party 0's "p1" fields for the whole job, in plan order (uint64). Draws both parties' streams exactly as
    ``party_materials`` does at each party."""
    s0, s1 = AesCtrStream(key0, stream_id), AesCtrStream(key1, stream_id)
    out: list[np.ndarray] = []
    for step in plan:
        if isinstance(step, Cmp):
            _dealer_cmp(s0, s1, step.size, out)
        elif isinstance(step, Mux):
            _dealer_mux(s0, s1, step.size, step.values, out)
        else:
            sq = s0.u64(step.size) + s1.u64(step.size)
            out.append(sq * sq - s1.u64(step.size))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.uint64)


def _dealer_cmp(s0: AesCtrStream, s1: AesCtrStream, size: int, out: list[np.ndarray]) -> None:
    w = n_words(size)
    r = (s0.u64(size) + s1.u64(size)) & MASK
    r_bits = bitslice(r, N_BITS)
    out.append((r_bits ^ s1.u64(N_BITS * w).reshape(N_BITS, w)).ravel())
    pair_and = r_bits[1:2 * FIRST_PAIRS:2] & r_bits[0:2 * FIRST_PAIRS:2]
    out.append((pair_and ^ s1.u64(FIRST_PAIRS * w).reshape(FIRST_PAIRS, w)).ravel())
    for p in tree_pairs(LATER_WIDTH):
        abb = (s0.u64(3 * p * w) ^ s1.u64(3 * p * w)).reshape(3, p, w)
        cc1 = s1.u64(2 * p * w).reshape(2, p, w)
        a, b1, b2 = abb
        out.append((np.stack([a & b1, a & b2]) ^ cc1).ravel())


def _dealer_mux(s0: AesCtrStream, s1: AesCtrStream, size: int, values: int, out: list[np.ndarray]) -> None:
    w = n_words(size)
    rho = unbitslice(s0.u64(w) ^ s1.u64(w), size)
    out.append(rho - s1.u64(size))
    b = (s0.u64(values * size) + s1.u64(values * size)).reshape(values, size)
    out.append((rho * b - s1.u64(values * size).reshape(values, size)).ravel())
