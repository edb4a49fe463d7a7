"""Threshold and max/argmax on additive shares with dealer-made bits: few rounds, few bytes.

Replaces CrypTen's comparison (64-bit A2B, a Kogge-Stone adder over all 64 bits, B2A and a separate Beaver
multiply: ~38 logged rounds and ~630 bytes per gallery row in the knockout) by a protocol built for what the
match circuit needs. Inputs are CrypTen-compatible int64 shares in Z_2^64 (read as uint64).

Comparison ``[y >= 0]`` for |y| < 2^(N-1), N = 38 (``correlations.N_BITS``):
1. y' = y + 2^(N-1) lies in [0, 2^N) and [y >= 0] = bit N-1 of y'. The parties open c = y' + r mod 2^N, where
   r is the dealer's uniform mask (1 round; c is uniform, so it says nothing about y).
2. y' = c - r, so its top bit is c_top XOR r_top XOR borrow, borrow = [c_low < r_low] over the N-1 low bits.
   c is public and r's bits are XOR-shared, so each bit position gives (G = r bigger here, P = equal here)
   locally, and a binary tree combines them: G = G_hi ^ (P_hi & G_lo), P = P_hi & P_lo — 6 levels of AND gates
   (Beaver triples on bits, 3 opened bits per node), all elements bit-sliced 64 to a word.
3. Selection: with the result bit g (XOR-shared) the parties open g ^ rho and v - b for each carried value v
   in ONE round and get additive shares of g and of g * v (rho random bit, b random value, and shares of
   rho, rho * b from the dealer): g = e + (1 - 2e) rho, g v = e f + e b + (1 - 2e)(rho f + rho b).
So one tournament level costs 8 rounds and ~40 bytes sent per compared pair, plus the dealer's ~40 bytes.

What is opened: c (uniform mod 2^N), bits masked by uniform triple bits, g ^ rho (uniform), v - b (uniform).
Nothing else leaves a party; the output stays an additive share. Security argument: ``docs/security.md``.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .bits import bitslice, unbitslice
from .correlations import LOW_BITS, MASK, N_BITS, CmpMaterial, MuxMaterial

HALF = np.uint64(1 << (N_BITS - 1))
ONE = np.uint64(1)


class PeerChannel:
    """Exchange equal-sized uint64 arrays with the other party (gloo point to point): one round each."""

    def __init__(self, rank: int) -> None:
        self.rank, self.peer = rank, 1 - rank
        self.bytes = 0   # sent + received, CrypTen's all_reduce convention
        self.rounds = 0

    def exchange(self, mine: np.ndarray) -> np.ndarray:
        import torch
        import torch.distributed as dist

        send = torch.from_numpy(np.ascontiguousarray(mine, dtype=np.uint64).reshape(-1).view(np.int64))
        recv = torch.empty_like(send)
        reqs = [dist.isend(send, self.peer), dist.irecv(recv, self.peer)]
        for req in reqs:
            req.wait()
        self.bytes += 16 * int(send.numel())
        self.rounds += 1
        return recv.numpy().view(np.uint64).reshape(np.shape(mine))


def compare_ge_zero(ch: PeerChannel, y: np.ndarray, mat: CmpMaterial) -> np.ndarray:
    """XOR shares, bit-sliced ([W] words), of [y_k >= 0] for the additively shared y [E] (|y| < 2^(N-1))."""
    rank = ch.rank
    masked = ((y + HALF) if rank == 0 else y) + mat.r_arith
    masked &= MASK
    c = (masked + ch.exchange(masked)) & MASK
    cs = bitslice(c, N_BITS)
    not_c = ~cs[:LOW_BITS]
    r_low = mat.r_bits[:LOW_BITS]
    g = not_c & r_low                               # r bigger at this position
    p = (r_low ^ not_c) if rank == 0 else r_low     # equal at this position
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
    return top ^ cs[LOW_BITS] if rank == 0 else top


def select(ch: PeerChannel, g_bits: np.ndarray, values: np.ndarray,
           mat: MuxMaterial) -> tuple[np.ndarray, np.ndarray]:
    """Additive shares of g [E] and of g * v for each row v of ``values`` [V, E], from XOR-shared g_bits."""
    size = mat.rho_arith.shape[0]
    words = g_bits.shape[0]
    f = values - mat.b
    payload = np.concatenate([g_bits ^ mat.rho_bits, f.reshape(-1)])
    theirs = ch.exchange(payload)
    e = unbitslice(payload[:words] ^ theirs[:words], size)
    f = f + theirs[words:].reshape(f.shape)
    sign = ONE - (e << ONE)                           # 1 - 2e (mod 2^64)
    g = sign * mat.rho_arith
    prod = sign * (mat.rho_arith * f + mat.rho_b) + e * mat.b
    if ch.rank == 0:
        g = g + e
        prod = prod + e * f
    return g, prod


def knockout(ch: PeerChannel, scores: np.ndarray, labels: np.ndarray | None,
             mats: Iterator) -> tuple[np.ndarray, np.ndarray | None]:
    """Shares of the best score per column of ``scores`` [n, Q] (and of its row's label, if given).

    Pairs rows (0,1), (2,3), ...; an odd last row passes up; ties go to the lower row (kept order).
    """
    vals, labs = scores, labels
    while vals.shape[0] > 1:
        m = vals.shape[0]
        h = m // 2
        a, b = vals[0:2 * h:2], vals[1:2 * h:2]
        diff = (a - b).reshape(-1)
        g = compare_ge_zero(ch, diff, next(mats))
        carried = [diff] if labs is None else [diff, (labs[0:2 * h:2] - labs[1:2 * h:2]).reshape(-1)]
        _, prod = select(ch, g, np.stack(carried), next(mats))
        new_vals = b + prod[0].reshape(b.shape)
        new_labs = None if labs is None else labs[1:2 * h:2] + prod[1].reshape(b.shape)
        if m % 2:
            new_vals = np.concatenate([new_vals, vals[m - 1:m]])
            new_labs = None if labs is None else np.concatenate([new_labs, labs[m - 1:m]])
        vals, labs = new_vals, new_labs
    return vals[0], (None if labs is None else labs[0])


def match(ch: PeerChannel, kind: str, scores: np.ndarray, labels: np.ndarray, threshold_raw: int,
          materials: list) -> np.ndarray:
    """This party's additive share (uint64) of the match output for scores [n, Q] (shares, scale 2^32).

    verify:        [max_i score_i >= T]                      -> [Q] (0/1)
    identify:      [max_i score_i >= T] * label(argmax_i)    -> [Q] (label or 0; the lowest row wins ties)
    identify-best: the knockout winner only, no threshold    -> [2Q]: Q score shares, then Q label shares
                   (one shard's candidate for ``merge``; see ``sharding.py``)
    ``labels`` [n] are public; ``materials`` follow ``correlations.match_plan(kind, n, Q)``.
    """
    mats = iter(materials)
    n, q = scores.shape
    lab = None
    if kind in ("identify", "identify-best"):
        lab = np.repeat(labels.astype(np.int64).view(np.uint64).reshape(n, 1), q, axis=1)
        if ch.rank == 1:
            lab = np.zeros_like(lab)
    best, best_label = knockout(ch, scores, lab, mats)
    if kind == "identify-best":
        _expect_end(mats)
        return np.concatenate([best, best_label])  # type: ignore[list-item]
    return _decide(ch, kind, best, best_label, threshold_raw, mats)


def merge(ch: PeerChannel, candidates: np.ndarray, threshold_raw: int, materials: list) -> np.ndarray:
    """Shares of the identify output over shard winners: ``candidates`` [K, 2Q] = this party's shares of each
    shard's (best score [Q], best label [Q]). Knockout over the K rows (ties: the lower shard), then threshold."""
    mats = iter(materials)
    q = candidates.shape[1] // 2
    best, best_label = knockout(ch, candidates[:, :q], candidates[:, q:], mats)
    return _decide(ch, "identify", best, best_label, threshold_raw, mats)


def _decide(ch: PeerChannel, kind: str, best: np.ndarray, best_label: np.ndarray | None, threshold_raw: int,
            mats: Iterator) -> np.ndarray:
    """[best >= T] (verify) or [best >= T] * best_label (identify), as additive shares."""
    q = best.shape[0]
    t = np.uint64(int(threshold_raw) % (1 << 64))
    y = best - t if ch.rank == 0 else best
    bit = compare_ge_zero(ch, y, next(mats))
    carried = np.stack([best_label]) if best_label is not None else np.zeros((0, q), dtype=np.uint64)
    g, prod = select(ch, bit, carried, next(mats))
    _expect_end(mats)
    return prod[0] if kind == "identify" else g


def _expect_end(mats: Iterator) -> None:
    if next(mats, None) is not None:
        raise RuntimeError("materials longer than the match plan")
