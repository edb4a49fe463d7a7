"""The dealer-bits comparison protocol (secure/mpc/protocols/compare.py, correlations.py, bits.py, prg.py).

Fast tests run both parties in this process, on two threads, with the real dealer corrections and PRG
streams; only the transport is a pair of in-memory queues (the gloo transport is covered with real
processes by test_mpc_realistic.py, test_mpc_recovery.py and test_mpc_fixed_gallery.py).
"""
from __future__ import annotations

import queue
import threading

import numpy as np
import pytest

from secure.mpc.protocols import compare
from secure.mpc.protocols import correlations as corr
from secure.mpc.primitives.bits import bitslice, n_words, tree_pairs, unbitslice
from secure.mpc.primitives.prg import AesCtrStream

KEYS = (bytes(range(16)), bytes(range(16, 32)))
LIMIT = 1 << (corr.N_BITS - 1)


class QueueChannel(compare.PeerChannel):
    def __init__(self, rank: int, boxes: list[queue.Queue]) -> None:
        super().__init__(rank)
        self.boxes = boxes

    def exchange(self, mine: np.ndarray) -> np.ndarray:
        mine = np.ascontiguousarray(mine, dtype=np.uint64)
        self.boxes[self.peer].put(mine.copy())
        other = self.boxes[self.rank].get(timeout=30)
        self.bytes += 16 * mine.size
        self.rounds += 1
        return other.reshape(mine.shape)


def share(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    s0 = rng.integers(0, 2**64, size=x.shape, dtype=np.uint64)
    return s0, x.astype(np.int64).view(np.uint64) - s0


def run_parties(kind: str, scores: np.ndarray, labels: np.ndarray, t_raw: int, batch: int,
                stream_id: int = 5, shared: tuple[np.ndarray, np.ndarray] | None = None,
                query: np.ndarray | None = None) -> tuple[list, QueueChannel]:
    """Both parties on threads; each party's output share. ``shared``: the parties' input shares given directly
    (merge), else ``scores`` is shared here. ``query`` [Q, d] (int64 fixed point): gate the output on it."""
    plan = corr.match_plan(kind, scores.shape[0], batch, 0 if query is None else query.shape[-1])
    q_shares = share(query, np.random.default_rng(stream_id + 1)) if query is not None else (None, None)
    corrections = corr.dealer_corrections(KEYS[0], KEYS[1], stream_id, plan)
    shares = shared or share(scores, np.random.default_rng(stream_id))
    boxes: list[queue.Queue] = [queue.Queue(), queue.Queue()]
    chans = [QueueChannel(0, boxes), QueueChannel(1, boxes)]
    out: list = [None, None]

    def party(rank: int) -> None:
        src = corr.PartySource(rank, AesCtrStream(KEYS[rank], stream_id), corrections if rank == 0 else None)
        mats = corr.party_materials(src, plan)
        if kind == "merge":
            out[rank] = compare.merge(chans[rank], shares[rank], t_raw, mats)
        else:
            out[rank] = compare.match(chans[rank], kind, shares[rank], labels, t_raw, mats,
                                      query=q_shares[rank])

    threads = [threading.Thread(target=party, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out, chans[0]


def run_match(kind: str, scores: np.ndarray, labels: np.ndarray, t_raw: int, batch: int,
              stream_id: int = 5, shared: tuple[np.ndarray, np.ndarray] | None = None,
              query: np.ndarray | None = None) -> tuple[np.ndarray, QueueChannel]:
    """The opened output of ``run_parties``."""
    out, ch = run_parties(kind, scores, labels, t_raw, batch, stream_id, shared, query)
    return (out[0] + out[1]).view(np.int64), ch


def plain(kind: str, scores: np.ndarray, labels: np.ndarray, t_raw: int) -> np.ndarray:
    best = scores.argmax(0)  # first maximum: the lowest row wins ties
    hit = scores.max(0) >= t_raw
    return np.where(hit, labels[best], 0) if kind == "identify" else hit.astype(np.int64)


def test_bitslice_round_trip_and_layout() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2**64, size=131, dtype=np.uint64)
    sl = bitslice(x, 64)
    assert sl.shape == (64, n_words(131)) == (64, 3)
    for j in (0, 1, 37, 63):
        assert np.array_equal(unbitslice(sl[j], 131), (x >> np.uint64(j)) & np.uint64(1))
    assert tree_pairs(37) == [18, 9, 5, 2, 1, 1] and tree_pairs(1) == [] and tree_pairs(2) == [1]


def test_prg_streams_are_deterministic_and_distinct() -> None:
    a = AesCtrStream(KEYS[0], 1).u64(1000)
    assert np.array_equal(a, AesCtrStream(KEYS[0], 1).u64(1000))
    assert not np.array_equal(a, AesCtrStream(KEYS[0], 2).u64(1000))
    assert not np.array_equal(a, AesCtrStream(KEYS[1], 1).u64(1000))
    bits = np.unpackbits(a.view(np.uint8))
    assert abs(bits.mean() - 0.5) < 0.01


def test_prg_is_plain_aes_ctr_across_block_and_call_boundaries() -> None:
    """The chunked keystream equals one AES-CTR encryption of zeros, however the draws are split."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    count = (1 << 17) + 3  # > one 1 MiB zero block, not a multiple of the AES block
    counter = (7).to_bytes(8, "big") + bytes(8)
    ref = Cipher(algorithms.AES(KEYS[0]), modes.CTR(counter)).encryptor().update(bytes(8 * (2 * count + 5)))
    ref_words = np.frombuffer(ref, dtype=np.uint64)
    stream = AesCtrStream(KEYS[0], 7)
    parts = [stream.u64(count), stream.u64(5), stream.u64(count)]
    assert np.array_equal(np.concatenate(parts), ref_words)


@pytest.mark.parametrize("kind", ["identify", "verify"])
@pytest.mark.parametrize("rows,batch", [(1, 0), (2, 0), (3, 0), (5, 4), (64, 0), (65, 0), (1000, 3)])
def test_match_equals_plaintext(kind: str, rows: int, batch: int) -> None:
    rng = np.random.default_rng(rows * 10 + batch)
    q = max(batch, 1)
    scores = rng.integers(-(2**33), 2**33, size=(rows, q))
    if rows > 3:
        scores[rows - 1] = scores.max(0)  # ties: the earlier row must win
        scores[1] = scores.max(0)
    labels = np.arange(100, 100 + rows)
    t_raw = int(np.median(scores))
    got, _ = run_match(kind, scores, labels, t_raw, batch)
    assert np.array_equal(got, plain(kind, scores, labels, t_raw))


def test_extremes_of_the_value_range() -> None:
    """Differences up to the documented bound |y| < 2^37 and scores exactly at the threshold."""
    edge = LIMIT // 2 - 1
    scores = np.array([[edge, -edge, 0, 7, 7, -edge, edge - 1, 1]]).T.repeat(3, axis=1)
    scores[:, 1] = -scores[:, 1]
    scores[:, 2] = 0
    labels = np.arange(1, 9)
    for t_raw in (edge, edge + 1, 0, 1, -edge):
        got, _ = run_match("identify", scores, labels, t_raw, 3)
        assert np.array_equal(got, plain("identify", scores, labels, t_raw)), t_raw


def test_cost_is_rounds_per_level_and_bytes_per_row() -> None:
    rows = 4096
    scores = np.random.default_rng(1).integers(-(2**32), 2**32, size=(rows, 1))
    _, ch = run_match("identify", scores, np.arange(1, rows + 1), 0, 0)
    # 12 knockout levels + the threshold, 7 rounds each: open c, 5 AND levels (the first is local), select
    assert ch.rounds == 7 * (12 + 1)
    print(f"bytes per row {ch.bytes / rows:.1f}")
    assert ch.bytes / rows < 64  # sent + received per gallery row (CrypTen's circuit: ~630)


def test_party0_rejects_a_short_or_long_correction_array() -> None:
    plan = corr.match_plan("verify", 4, 0)
    good = corr.dealer_corrections(KEYS[0], KEYS[1], 9, plan)
    with pytest.raises(RuntimeError, match="shorter"):
        corr.party_materials(corr.PartySource(0, AesCtrStream(KEYS[0], 9), good[:-1]), plan)
    with pytest.raises(RuntimeError, match="longer"):
        corr.party_materials(corr.PartySource(0, AesCtrStream(KEYS[0], 9), np.concatenate([good, good[:1]])), plan)
    with pytest.raises(ValueError):
        corr.match_plan("identify", 0, 0)


def test_opened_values_look_uniform() -> None:
    """What party 1 receives from party 0 in the first round (c = y' + r mod 2^N) does not depend on y."""
    got = []
    for value in (0, LIMIT // 2 - 1):
        scores = np.full((2048, 1), value)
        plan = corr.match_plan("verify", 2048, 0)
        corrections = corr.dealer_corrections(KEYS[0], KEYS[1], 3, plan)
        mat = corr.party_materials(corr.PartySource(0, AesCtrStream(KEYS[0], 3), corrections), plan)[0]
        s0, s1 = share(scores, np.random.default_rng(4))
        mat1 = corr.party_materials(corr.PartySource(1, AesCtrStream(KEYS[1], 3)), plan)[0]
        y0 = (s0[0::2] - s0[1::2]).reshape(-1)
        y1 = (s1[0::2] - s1[1::2]).reshape(-1)
        c = ((y0 + compare.HALF + mat.r_arith) + (y1 + mat1.r_arith)) & corr.MASK
        got.append(c.astype(np.float64) / float(1 << corr.N_BITS))
    for u in got:  # uniform on [0, 1): mean 1/2, std 1/sqrt(12)
        assert abs(u.mean() - 0.5) < 0.03 and abs(u.std() - 12 ** -0.5) < 0.02


@pytest.mark.parametrize("rows,k,q", [(1, 3, 4), (500, 128, 6), (9000, 256, 16), (300, 700, 5)])
def test_ring_matmul_is_exact_modulo_2_38(rows: int, k: int, q: int) -> None:
    import torch

    from secure.mpc.primitives.ring_matmul import K_BLOCK, MOD_BITS, digit_bits, float_matmul, to_float_rows

    g = torch.Generator().manual_seed(rows + k)
    m = torch.randint(-(2**63), 2**63 - 1, (rows, k), generator=g)
    v = torch.randint(-(2**63), 2**63 - 1, (k, q), generator=g)
    m[0] = 1 << 37                      # centred to -2^37: the largest magnitude
    bits = digit_bits(min(k, K_BLOCK))
    v[:, 0] = sum(1 << (bits - 1 + bits * j) for j in range(63 // bits))  # every digit at the edge of its range
    want = (m @ v) & ((1 << MOD_BITS) - 1)
    assert torch.equal(float_matmul(to_float_rows(m), v), want)
    assert torch.equal(float_matmul(to_float_rows(m), v[:, 0]), want[:, 0])


@pytest.mark.parametrize("shards", [2, 3])
def test_shard_winners_then_merge_equal_the_global_decision(shards: int) -> None:
    """identify-best on each shard (rows with label % K == k), then merge: only the final output is opened."""
    rng = np.random.default_rng(shards)
    rows, q = 301, 4
    scores = rng.permutation(rows * q).reshape(rows, q).astype(np.int64) * 4099 - 2**30  # distinct: no ties
    labels = np.arange(1000, 1000 + rows)
    t_raw = int(np.quantile(scores, 0.99))
    parts = [np.flatnonzero(labels % shards == k) for k in range(shards)]
    cand = [np.zeros((shards, 2 * q), dtype=np.uint64) for _ in (0, 1)]
    for k, idx in enumerate(parts):
        out, _ = run_parties("identify-best", scores[idx], labels[idx], t_raw, q, stream_id=10 + k)
        cand[0][k], cand[1][k] = out
        winners = (out[0] + out[1]).view(np.int64)
        assert np.array_equal(winners[:q], scores[idx].max(0))  # the shard's best score and label (test only)
        assert np.array_equal(winners[q:], labels[idx][scores[idx].argmax(0)])
    got, _ = run_match("merge", np.zeros((shards, 2 * q)), labels, t_raw, q, stream_id=50,
                       shared=(cand[0], cand[1]))
    assert np.array_equal(got, plain("identify", scores, labels, t_raw))


# ------------------------------------------------------------------ the query gate (scaled-query attack, issue 9)
UNIT = 1 << 16


def _unit_fixed(rng: np.random.Generator, q: int, d: int) -> np.ndarray:
    x = rng.normal(size=(q, d))
    return np.round(x / np.linalg.norm(x, axis=1, keepdims=True) * UNIT).astype(np.int64)


@pytest.mark.parametrize("kind", ["verify", "identify"])
def test_query_gate_passes_unit_queries_and_zeroes_scaled_ones(kind: str) -> None:
    """Queries: unit, unit with one coordinate exactly +-1, scaled by 1.01 (norm), scaled by 64 (the attack),
    one coordinate 2^38 + 5 (equal to 5 modulo 2^38: the scores see 5, so it passes only if the rest is unit),
    and a coordinate out of [-1, 1] hidden in a short vector. Every score passes the threshold: the output is
    the plaintext one exactly where the query is at most unit, and 0 elsewhere."""
    rng = np.random.default_rng(3)
    d = 40
    queries = _unit_fixed(rng, 6, d)
    queries[1] = 0
    queries[1, 7] = -UNIT
    queries[2] = np.round(queries[2] * 1.01).astype(np.int64)
    queries[3] = queries[3] * 64
    queries[4] = 0
    queries[4, 0] = (1 << 38) + 5
    queries[5] = 0
    queries[5, 3] = UNIT + 1
    n = 9
    scores = rng.integers(2**30, 2**31, size=(n, 6)).astype(np.int64)  # all above the threshold
    labels = np.arange(11, 11 + n, dtype=np.int64)
    got, _ = run_match(kind, scores, labels, 1 << 29, 6, query=queries)
    want = plain(kind, scores, labels, 1 << 29)
    ok = np.array([True, True, False, False, True, False])
    assert np.array_equal(got, np.where(ok, want, 0)), (got, want)


def test_query_gate_on_identify_best_zeroes_the_label() -> None:
    rng = np.random.default_rng(4)
    queries = _unit_fixed(rng, 2, 16)
    queries[1] *= 3
    scores = rng.integers(2**30, 2**31, size=(5, 2)).astype(np.int64)
    labels = np.arange(1, 6, dtype=np.int64)
    got, _ = run_match("identify-best", scores, labels, 0, 2, query=queries)
    assert got[2] == labels[scores[:, 0].argmax()] and got[3] == 0


def test_query_gate_costs_a_few_rounds() -> None:
    rng = np.random.default_rng(5)
    queries = _unit_fixed(rng, 1, 128)
    scores = rng.integers(0, 2**31, size=(64, 1)).astype(np.int64)
    labels = np.arange(1, 65, dtype=np.int64)
    _, plain_ch = run_match("identify", scores, labels, 1 << 30, 0)
    _, gated_ch = run_match("identify", scores, labels, 1 << 30, 0, query=queries[0])
    assert gated_ch.rounds - plain_ch.rounds <= 16
