"""Threshold and max/argmax on additive shares with dealer-made bits: few rounds, few bytes.

Replaces CrypTen's comparison (64-bit A2B, a Kogge-Stone adder over all 64 bits, B2A and a separate Beaver
multiply: ~38 logged rounds and ~630 bytes per gallery row in the knockout) by a protocol built for what the
match circuit needs. Inputs are CrypTen-compatible int64 shares in Z_2^64 (read as uint64).

Comparison ``[y >= 0]`` for |y| < 2^(N-1), N = 38 (``correlations.N_BITS``):
1. y' = y + 2^(N-1) lies in [0, 2^N) and [y >= 0] = bit N-1 of y'. The parties open c = y' + r mod 2^N, where
   r is the dealer's uniform mask (1 round; c is uniform, so it says nothing about y).
2. y' = c - r, so its top bit is c_top XOR r_top XOR borrow, borrow = [c_low < r_low] over the N-1 low bits.
   c is public and r's bits are XOR-shared, so each bit position gives (G = r bigger here, P = equal here)
   locally, and a binary tree combines them: G = G_hi ^ (P_hi & G_lo), P = P_hi & P_lo. Its first level is
   local too (the dealer shares r_hi & r_lo; ``_first_level``); the 5 levels left are AND gates on Beaver
   triples (3 opened bits per node), all elements bit-sliced 64 to a word.
3. Selection: with the result bit g (XOR-shared) the parties open e = g ^ rho and f = v - b for each carried
   value v in ONE round (rho random bit, b random value, and shares of rho, rho * b from the dealer); then
   g = rho or 1 - rho and g v = rho v or v - rho v (as e = 0 or 1), with shares of rho v = rho_i f + (rho b)_i.
So one tournament level costs 7 rounds and ~27-35 bytes sent per compared pair, plus ~30 bytes from the
dealer to party 0.

What is opened: c (uniform mod 2^N), bits masked by uniform triple bits, g ^ rho (uniform), v - b (uniform).
Nothing else leaves a party; the output stays an additive share. Security argument: ``docs/security.md``.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from secure.mpc.primitives.bits import bitslice, unbitslice_bool
from secure.mpc.protocols.correlations import GATE_BLOCK, LOW_BITS, MASK, N_BITS, CmpMaterial, MuxMaterial, SqMaterial
from secure.mpc.runtime.peer_link import PeerLink

HALF = np.uint64(1 << (N_BITS - 1))
ONE = np.uint64(1)
UNIT = 1 << 16                      # a coordinate of a unit vector in fixed point is at most this (fixedpoint.SCALE)
NORM2_MAX = int(UNIT * UNIT * 1.001)  # squared norm of a unit vector plus rounding slack (secure/ranges.MAX_NORM2)


class PeerChannel:
    """Exchange equal-sized uint64 arrays with the other party: one round each. Over the parties' direct link
    (``peer_link.py``) when there is one, else gloo point to point."""

    def __init__(self, rank: int, link: PeerLink | None = None) -> None:
        self.rank, self.peer, self.link = rank, 1 - rank, link
        self.bytes = 0   # sent + received, CrypTen's all_reduce convention
        self.rounds = 0

    def exchange(self, mine: np.ndarray) -> np.ndarray:
        send = np.ascontiguousarray(mine, dtype=np.uint64)
        self.bytes += 2 * send.nbytes
        self.rounds += 1
        if self.link is not None:
            return self.link.exchange(send)
        import torch
        import torch.distributed as dist

        out = torch.from_numpy(send.reshape(-1).view(np.int64))
        recv = torch.empty_like(out)
        for req in (dist.isend(out, self.peer), dist.irecv(recv, self.peer)):
            if req is not None:  # None only outside the sender's or receiver's group, never between two parties
                req.wait()
        return recv.numpy().view(np.uint64).reshape(send.shape)


def compare_ge_zero(ch: PeerChannel, y: np.ndarray, mat: CmpMaterial) -> np.ndarray:
    """XOR shares, bit-sliced ([W] words), of [y_k >= 0] for the additively shared y [E] (|y| < 2^(N-1))."""
    rank = ch.rank
    masked = ((y + HALF) if rank == 0 else y) + mat.r_arith
    masked &= MASK
    c = (masked + ch.exchange(masked)) & MASK
    cs = bitslice(c, N_BITS)
    g, p = _first_level(rank, ~cs[:LOW_BITS], mat.r_bits[:LOW_BITS], mat.pair_and)
    for t in mat.triples:
        k = g.shape[0]
        half = k // 2
        hi_p, hi_g = p[1:2 * half:2], g[1:2 * half:2]
        lo_p, lo_g = p[0:2 * half:2], g[0:2 * half:2]
        masked_bits = np.stack([hi_p ^ t.a, lo_g ^ t.b1, lo_p ^ t.b2])
        d, e1, e2 = masked_bits ^ ch.exchange(masked_bits)
        and_g = (d & t.b1) ^ (t.a & e1) ^ t.c1
        and_p = (d & t.b2) ^ (t.a & e2) ^ t.c2
        if rank == 0:
            and_g ^= d & e1
            and_p ^= d & e2
        new_g, new_p = hi_g ^ and_g, and_p
        if k % 2:
            new_g = np.concatenate([new_g, g[k - 1:k]])
            new_p = np.concatenate([new_p, p[k - 1:k]])
        g, p = new_g, new_p
    top = mat.r_bits[LOW_BITS] ^ g[0]
    out: np.ndarray = top ^ cs[LOW_BITS] if rank == 0 else top
    return out


def _first_level(rank: int, nc: np.ndarray, r: np.ndarray, pair_and: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """XOR shares of (G, P) after the borrow tree's first level, without communication.

    Per position k (c public, r XOR-shared): g_k = ~c_k & r_k (r bigger here), p_k = r_k ^ ~c_k (equal here).
    A pair (hi, lo) combines to G = g_hi ^ (p_hi & g_lo), P = p_hi & p_lo. With m = r_hi & r_lo (``pair_and``,
    shared by the dealer) both are linear in the shares:
      p_hi & g_lo = ~c_lo & (m ^ (~c_hi & r_lo)),   P = m ^ (r_hi & ~c_lo) ^ (~c_hi & r_lo) ^ (~c_hi & ~c_lo).
    ``nc`` = ~c's bit rows, ``r`` = this party's shares of r's bit rows (LOW_BITS each); an odd top position
    passes up as (g_k, p_k).
    """
    h = pair_and.shape[0]
    nc_hi, nc_lo, r_hi, r_lo = nc[1:2 * h:2], nc[0:2 * h:2], r[1:2 * h:2], r[0:2 * h:2]
    hi_c_lo_r = nc_hi & r_lo
    g = (nc_hi & r_hi) ^ (nc_lo & (pair_and ^ hi_c_lo_r))
    p = pair_and ^ (r_hi & nc_lo) ^ hi_c_lo_r
    if rank == 0:
        p ^= nc_hi & nc_lo
    if nc.shape[0] > 2 * h:
        top_g = nc[2 * h:] & r[2 * h:]
        top_p = (r[2 * h:] ^ nc[2 * h:]) if rank == 0 else r[2 * h:]
        g, p = np.concatenate([g, top_g]), np.concatenate([p, top_p])
    return g, p


def select(ch: PeerChannel, g_bits: np.ndarray, values: np.ndarray, mat: MuxMaterial) -> np.ndarray:
    """Additive shares of g * v for each row v of ``values`` [V, E] (this party's shares), from XOR-shared g_bits."""
    return _select(ch, g_bits, values, mat, want_g=False)[1]


def select_bit(ch: PeerChannel, g_bits: np.ndarray, values: np.ndarray,
               mat: MuxMaterial) -> tuple[np.ndarray, np.ndarray]:
    """``select``, plus additive shares of g itself [E] (the same round)."""
    g, products = _select(ch, g_bits, values, mat, want_g=True)
    assert g is not None
    return g, products


def _select(ch: PeerChannel, g_bits: np.ndarray, values: np.ndarray, mat: MuxMaterial,
            want_g: bool) -> tuple[np.ndarray | None, np.ndarray]:
    """Shares of g * v (and of g with ``want_g``).

    One round: open e = g ^ rho and f = v - b. Then g = rho (e = 0) or 1 - rho (e = 1), so g v = rho v or
    v - rho v, and the shares of rho v are rho_i f + (rho b)_i.
    """
    size = mat.rho_arith.shape[0]
    words = g_bits.shape[0]
    payload = np.empty(words + values.size, dtype=np.uint64)
    np.bitwise_xor(g_bits, mat.rho_bits, out=payload[:words])
    f = payload[words:].reshape(values.shape)
    np.subtract(values, mat.b, out=f)
    theirs = ch.exchange(payload)
    e = unbitslice_bool(payload[:words] ^ theirs[:words], size)
    f += theirs[words:].reshape(f.shape)         # f = v - b, opened
    rho_v = f                                    # shares of rho * v, in place: rho_i f + (rho b)_i
    rho_v *= mat.rho_arith
    rho_v += mat.rho_b
    np.subtract(values, rho_v, out=rho_v, where=e)  # where e = 1: g = 1 - rho, so g v = v - rho v
    g = None
    if want_g:
        g = mat.rho_arith.copy()
        np.subtract(ONE if ch.rank == 0 else np.uint64(0), mat.rho_arith, out=g, where=e)
    return g, rho_v


def _public_share(ch: PeerChannel, x: np.ndarray) -> np.ndarray:
    """A public value as an additive share: party 0 holds it, party 1 holds 0."""
    return x if ch.rank == 0 else np.zeros_like(x)


def knockout(ch: PeerChannel, scores: np.ndarray, mats: Iterator[Any]) -> np.ndarray:
    """Shares of the best score per column of ``scores`` [n, Q]. Pairs rows (0,1), (2,3), ...; an odd last row
    passes up."""
    vals = scores
    while vals.shape[0] > 1:
        m = vals.shape[0]
        h = m // 2
        a, b = vals[0:2 * h:2], vals[1:2 * h:2]
        diff = (a - b).reshape(-1)
        prod = select(ch, compare_ge_zero(ch, diff, next(mats)), diff[None], next(mats))
        vals = _carry_odd(b + prod[0].reshape(b.shape), vals, m)
    result: np.ndarray = vals[0]
    return result


def knockout_labeled(ch: PeerChannel, scores: np.ndarray, labels: np.ndarray, mats: Iterator[Any],
                     labels_public: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Shares of the best score per column of ``scores`` [n, Q] and of its row's label (``labels`` [n, Q]).

    Ties go to the lower row (kept order). ``labels_public``: ``labels`` are the same public values at both
    parties (not shares). Then the first level needs no selection for them: the winner's label is b + g (a - b)
    with a, b public, local once g is shared.
    """
    vals, labs, public = scores, labels, labels_public
    while vals.shape[0] > 1:
        m = vals.shape[0]
        h = m // 2
        a, b = vals[0:2 * h:2], vals[1:2 * h:2]
        diff = (a - b).reshape(-1)
        g_bits = compare_ge_zero(ch, diff, next(mats))
        if public:
            g, prod = select_bit(ch, g_bits, diff[None], next(mats))
            la, lb = labs[0:2 * h:2], labs[1:2 * h:2]
            new_labs = g.reshape(lb.shape) * (la - lb) + _public_share(ch, lb)
        else:
            lab_diff = (labs[0:2 * h:2] - labs[1:2 * h:2]).reshape(-1)
            prod = select(ch, g_bits, np.stack([diff, lab_diff]), next(mats))
            new_labs = labs[1:2 * h:2] + prod[1].reshape(b.shape)
        if m % 2:
            new_labs = np.concatenate([new_labs, _public_share(ch, labs[m - 1:m]) if public else labs[m - 1:m]])
        labs = new_labs
        vals, public = _carry_odd(b + prod[0].reshape(b.shape), vals, m), False
    return vals[0], (_public_share(ch, labs[0]) if public else labs[0])


def _carry_odd(winners: np.ndarray, vals: np.ndarray, m: int) -> np.ndarray:
    """The next level: the pairs' winners, and an odd last row passing up."""
    return np.concatenate([winners, vals[m - 1:m]]) if m % 2 else winners


def query_ok(ch: PeerChannel, query: np.ndarray, mats: Iterator[Any]) -> np.ndarray:
    """XOR shares (bit-sliced) of [the query is at most a unit vector], one bit per query of ``query`` [Q, d].

    Why: the threshold is fixed at the parties, but a query scaled by c moves the score by c, so whoever sends a
    query could still choose the effective threshold (``bench/threshold_search.py``: the scaled-query attack).
    The gate checks, on shares, that every coordinate lies in [-1, 1] and that the squared norm is at most
    NORM2_MAX; the job's output is multiplied by this bit at the end (``match``), so an oversized query reveals 0.
    Everything is read modulo 2^38 like the scores, which depend on the query only modulo 2^38 too: the bit
    speaks for the query the comparison actually sees. Blocks of 16 squares (each < 2^36) keep every compared
    value inside the comparison's range whenever the coordinate checks pass (otherwise the AND fails anyway).
    Rounds: 1 (squares) + 6 (comparisons) + 1 (bits to counts) + 6 (all passed?).
    """
    rank = ch.rank
    q = np.ascontiguousarray(query, dtype=np.int64).view(np.uint64)
    n_q, d = q.shape
    sq: SqMaterial = next(mats)
    s = sq.s.reshape(n_q, d)
    masked = q - s
    e = masked + ch.exchange(masked)                     # e = q - s, opened (s fresh and uniform)
    squares = 2 * e * s + sq.s2.reshape(n_q, d)          # shares of q^2 = e^2 + 2 e s + s^2
    if rank == 0:
        squares += e * e
    blocks = -(-d // GATE_BLOCK)
    padded = np.zeros((n_q, blocks * GATE_BLOCK), dtype=np.uint64)
    padded[:, :d] = squares
    block_sums = padded.reshape(n_q, blocks, GATE_BLOCK).sum(axis=2, dtype=np.uint64)
    total = squares.sum(axis=1, dtype=np.uint64)[:, None]
    unit, bound = (np.uint64(UNIT), np.uint64(NORM2_MAX)) if rank == 0 else (np.uint64(0), np.uint64(0))
    y = np.concatenate([unit - q, q + unit, bound - block_sums, bound - total], axis=1)  # each >= 0 when fine
    bits = compare_ge_zero(ch, y.reshape(-1), next(mats))
    passed, _ = select_bit(ch, bits, np.zeros((0, y.size), dtype=np.uint64), next(mats))
    count = passed.reshape(n_q, -1).sum(axis=1, dtype=np.uint64)
    if rank == 0:
        count -= np.uint64(y.shape[1])
    return compare_ge_zero(ch, count, next(mats))       # [count - checks >= 0]: every check passed


def _gate(ch: PeerChannel, ok_bits: np.ndarray, values: np.ndarray, mats: Iterator[Any]) -> np.ndarray:
    """Shares of ok * v for additively shared v [Q]."""
    out: np.ndarray = select(ch, ok_bits, values[None], next(mats))[0]
    return out


def match(ch: PeerChannel, kind: str, scores: np.ndarray, labels: np.ndarray, threshold_raw: int,
          materials: list[Any], query: np.ndarray | None = None) -> np.ndarray:
    """This party's additive share (uint64) of the match output for scores [n, Q] (shares, scale 2^32).

    verify:        [max_i score_i >= T]                      -> [Q] (0/1)
    identify:      [max_i score_i >= T] * label(argmax_i)    -> [Q] (label or 0; the lowest row wins ties)
    identify-best: the knockout winner only, no threshold    -> [2Q]: Q score shares, then Q label shares
                   (one shard's candidate for ``merge``; see ``sharding.py``)
    ``labels`` [n] are public; ``materials`` follow ``correlations.match_plan(kind, n, Q, d)``.
    ``query`` [Q, d] (this party's shares): gate the output on the query being at most a unit vector
    (``query_ok``; the plan then has d > 0); identify-best gates its label (label 0 never matches).
    """
    mats = iter(materials)
    n, q = scores.shape
    ok = query_ok(ch, query.reshape(q, -1), mats) if query is not None else None
    if kind == "verify":
        out = _decide(ch, kind, knockout(ch, scores, mats), None, threshold_raw, mats)
    else:
        lab = np.broadcast_to(labels.astype(np.int64).view(np.uint64).reshape(n, 1), (n, q))
        best, best_label = knockout_labeled(ch, scores, lab, mats, labels_public=True)
        if kind == "identify-best":  # the label is gated (label 0 never matches), the score is not
            if ok is not None:
                best_label = _gate(ch, ok, best_label, mats)
            _expect_end(mats)
            return np.concatenate([best, best_label])
        out = _decide(ch, kind, best, best_label, threshold_raw, mats)
    if ok is not None:
        out = _gate(ch, ok, out, mats)
    _expect_end(mats)
    return out


def merge(ch: PeerChannel, candidates: np.ndarray, threshold_raw: int, materials: list[Any]) -> np.ndarray:
    """Shares of the identify output over shard winners: ``candidates`` [K, 2Q] = this party's shares of each
    shard's (best score [Q], best label [Q]). Knockout over the K rows (ties: the lower shard), then threshold."""
    mats = iter(materials)
    q = candidates.shape[1] // 2
    best, best_label = knockout_labeled(ch, candidates[:, :q], candidates[:, q:], mats)
    out = _decide(ch, "identify", best, best_label, threshold_raw, mats)
    _expect_end(mats)
    return out


def _decide(ch: PeerChannel, kind: str, best: np.ndarray, best_label: np.ndarray | None, threshold_raw: int,
            mats: Iterator[Any]) -> np.ndarray:
    """[best >= T] (verify) or [best >= T] * best_label (identify), as additive shares."""
    q = best.shape[0]
    t = np.uint64(int(threshold_raw) % (1 << 64))
    y = best - t if ch.rank == 0 else best
    bit = compare_ge_zero(ch, y, next(mats))
    if kind == "identify":
        assert best_label is not None
        product: np.ndarray = select(ch, bit, np.stack([best_label]), next(mats))[0]
        return product
    g, _ = select_bit(ch, bit, np.zeros((0, q), dtype=np.uint64), next(mats))
    return g


def _expect_end(mats: Iterator[Any]) -> None:
    if next(mats, None) is not None:
        raise RuntimeError("materials longer than the match plan")
