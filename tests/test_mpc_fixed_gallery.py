"""Fixed-gallery score protocol: exact ring arithmetic (no processes), then the engine with real processes."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from devtools.mpc_cluster import Cluster, encode_trunc, split
from secure.mpc.protocols.fixed_gallery import (
    DealerGalleryMasks,
    gather_ranges,
    ring_score_share,
    split_rows_to_ranges,
    uses_floats,
)
from secure.mpc.primitives.ring_matmul import to_float_rows

M64 = 1 << 64


def _rand(rng: np.random.Generator, *shape: int) -> torch.Tensor:
    return torch.from_numpy(rng.integers(-(2**63), 2**63 - 1, size=shape, dtype=np.int64, endpoint=True))


def _exact_matvec(g: torch.Tensor, x: torch.Tensor) -> np.ndarray:
    """G x mod 2^64 with Python integers (no wraparound shortcuts), as int64."""
    gi = [[int(v) for v in row] for row in g.tolist()]
    xi = [int(v) for v in x.tolist()]
    out = []
    for row in gi:
        v = sum(a * b for a, b in zip(row, xi)) % M64
        out.append(v - M64 if v >= 1 << 63 else v)
    return np.array(out, dtype=np.int64)


@pytest.mark.parametrize("n,d", [(1, 1), (7, 5), (33, 128)])
def test_reconstructed_shares_equal_gx_exactly(n: int, d: int) -> None:
    """Random full-range ring data: reconstruct(share_0 + share_1) == G x mod 2^64, bit for bit."""
    rng = np.random.default_rng(n * 1000 + d)
    for _ in range(3):
        g, x = _rand(rng, n, d), _rand(rng, d)                      # secrets (any ring values)
        a0, a1, b0, b1 = _rand(rng, n, d), _rand(rng, n, d), _rand(rng, d), _rand(rng, d)
        a, b = a0 + a1, b0 + b1                                     # dealer's mask (wraps)
        c = torch.mv(a, b)
        c1 = _rand(rng, n)
        c0 = c - c1
        g0 = _rand(rng, n, d)
        g1 = g - g0
        x0 = _rand(rng, d)
        x1 = x - x0
        e = (g0 - a0) + (g1 - a1)                                   # opened once
        f = (x0 - b0) + (x1 - b1)                                   # opened per query
        s0 = ring_score_share(0, torch.cat([e, a0], 1), f, b0, c0)
        s1 = ring_score_share(1, torch.cat([e, a1], 1), f, b1, c1)
        assert np.array_equal((s0 + s1).numpy(), _exact_matvec(g, x))


def test_fixed_point_scores_match_the_naive_scale() -> None:
    """With 16-bit fixed-point inputs the reconstructed score is <Enc(g), Enc(x)> (scale 2^32), no truncation."""
    rng = np.random.default_rng(5)
    gf = rng.normal(size=(20, 128))
    gf /= np.linalg.norm(gf, axis=1, keepdims=True)
    xf = gf[3] * 0.9 + 0.1 * rng.normal(size=128)
    ge, xe = encode_trunc(gf), encode_trunc(xf)
    g0, g1 = split(ge, rng)
    x0, x1 = split(xe, rng)
    a0, a1, b0, b1 = _rand(rng, 20, 128), _rand(rng, 20, 128), _rand(rng, 128), _rand(rng, 128)
    c1 = _rand(rng, 20)
    c0 = torch.mv(a0 + a1, b0 + b1) - c1
    t = torch.from_numpy
    e = (t(g0) - a0) + (t(g1) - a1)
    f = (t(x0) - b0) + (t(x1) - b1)
    s = ring_score_share(0, torch.cat([e, a0], 1), f, b0, c0) + ring_score_share(1, torch.cat([e, a1], 1), f, b1, c1)
    assert np.array_equal(s.numpy(), ge @ xe)
    assert np.allclose(s.numpy() / 2.0**32, gf @ xf, atol=128 * 2**-15)


def test_batched_shares_equal_gx_exactly() -> None:
    rng = np.random.default_rng(3)
    n, d, q = 9, 16, 4
    g, x = _rand(rng, n, d), _rand(rng, q, d)
    a0, a1, b0, b1 = _rand(rng, n, d), _rand(rng, n, d), _rand(rng, q, d), _rand(rng, q, d)
    c1 = _rand(rng, n, q)
    c0 = torch.mm(a0 + a1, (b0 + b1).t()) - c1
    g0 = _rand(rng, n, d)
    x0 = _rand(rng, q, d)
    e = (g0 - a0) + ((g - g0) - a1)
    f = (x0 - b0) + ((x - x0) - b1)
    s = ring_score_share(0, torch.cat([e, a0], 1), f, b0, c0) + ring_score_share(1, torch.cat([e, a1], 1), f, b1, c1)
    for j in range(q):
        assert np.array_equal(s[:, j].numpy(), _exact_matvec(g, x[j]))


def test_float_products_agree_with_int64_modulo_2_38() -> None:
    """The float64 path (batches on the CPU; every product on a GPU) equals the int64 ring product mod 2^38,
    for one query and for a batch, at the parties (ring_score_share) and at the dealer (DealerGalleryMasks)."""
    from secure.mpc.runtime.crypten_compat import load_crypten

    load_crypten()
    rng = np.random.default_rng(8)
    n, d, low = 300, 128, (1 << 38) - 1
    ea, c = _rand(rng, n, 2 * d), _rand(rng, n, 3)
    floats = to_float_rows(ea)
    for q_shape, cc in (((d,), c[:, 0]), ((3, d), c)):
        f, b = _rand(rng, *q_shape), _rand(rng, *q_shape)
        for rank in (0, 1):
            exact = ring_score_share(rank, ea, f, b, cc)
            assert torch.equal(ring_score_share(rank, ea, f, b, cc, floats) & low, exact & low)
    for batch in (0, 5):
        answers = []
        for use_floats in (False, True):
            gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
            dealer = DealerGalleryMasks()
            dealer.add(gens, n, d)
            answers.append(dealer.query(gens, [[0, 120], [200, 100]], d, batch, use_floats) & low)
        assert torch.equal(answers[0], answers[1])


def test_float_rule_is_every_product_on_a_gpu_and_batches_on_the_cpu() -> None:
    assert uses_floats("cuda", True, (128,)) and uses_floats("cuda", True, (2, 128))
    assert uses_floats("cpu", True, (16, 128)) and uses_floats("cpu", True, (4, 128))
    assert not uses_floats("cpu", True, (128,)) and not uses_floats("cpu", True, (3, 128))
    assert not uses_floats("cuda", False, (16, 128))  # CrypTen's comparison reads all 64 bits


def test_ranges_round_trip() -> None:
    slots = torch.tensor([5, 6, 7, 0, 1, 9, 3, 4], dtype=torch.long)
    ranges = split_rows_to_ranges(slots)
    assert ranges == [[5, 3], [0, 2], [9, 1], [3, 2]]
    store = torch.arange(10 * 2, dtype=torch.long).reshape(10, 2)
    assert torch.equal(gather_ranges(store, ranges), store[slots])
    assert gather_ranges(store, [[2, 4]]).data_ptr() == store[2].data_ptr()  # contiguous: a view, no copy


# ------------------------------------------------------------------------------------- with real processes
D = 128
FAST = {"op_timeout_s": 6, "connect_timeout_s": 8, "heartbeat_s": 0.5, "pair_wait_s": 1.0,
        "retry_backoff_s": 0.2, "protocol": "fixed-gallery"}


def _unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _plain(q: np.ndarray, g: np.ndarray, labels: np.ndarray, thr: float) -> int:
    s = g @ q
    best = int(np.argmax(s))
    return int(labels[best]) if s[best] >= thr else 0


def _run_shared(cluster: Cluster, q: np.ndarray, shares: tuple[np.ndarray, np.ndarray], labels: np.ndarray,
                thr: float, rng: np.random.Generator) -> tuple[int, list]:
    """Identify with FIXED gallery shares (so the parties' mask cache can hit), fresh query shares."""
    out, _, stats = cluster.run_shared("identify", q, shares, labels, thr, rng)
    return out, stats


@pytest.mark.slow
def test_engine_reuses_masks_and_remasks_changed_rows(tmp_path) -> None:
    rng = np.random.default_rng(11)
    n = 40
    g = _unit(rng, n, D)
    labels = np.arange(101, 101 + n, dtype=np.int64)
    g0, g1 = split(encode_trunc(g), rng)
    with Cluster(tmp_path, **FAST) as cluster:
        cluster.wait_connected(90)
        setups, traffic = [], []
        for i in range(4):
            plant = int(rng.integers(n))
            q = _unit(rng, D)
            if i % 2 == 0:  # genuine match half of the time
                q = 0.8 * g[plant] + 0.2 * q
                q /= np.linalg.norm(q)
            thr = 0.5
            out, stats = _run_shared(cluster, q, (g0, g1), labels, thr, rng)
            assert out == _plain(q, g, labels, thr)
            assert stats[0]["protocol"] == "fixed-gallery" and stats[1]["protocol"] == "fixed-gallery"
            setups.append(stats[0]["setup_rows"])
            traffic.append(stats[0]["bytes"])
        assert setups == [n, 0, 0, 0]  # masks opened once, then reused
        # the n*d opening of E happens in the first job only; later jobs carry O(n + d) for the scores
        assert max(traffic[1:]) + 8 * n * D <= traffic[0]
        # a batch of 5 queries in one MPC job: one output share per query, masks still reused
        qb = np.stack([_unit(rng, D) for _ in range(5)])
        qb[1] = 0.8 * g[3] + 0.2 * qb[1]
        qb[3] = 0.8 * g[30] + 0.2 * qb[3]
        qb /= np.linalg.norm(qb, axis=1, keepdims=True)
        outs, stats = _run_shared(cluster, qb, (g0, g1), labels, 0.5, rng)
        assert outs == [_plain(qb[j], g, labels, 0.5) for j in range(5)]
        assert outs[1] == 104 and outs[3] == 131
        assert stats[0]["setup_rows"] == 0
        # enrol 3 rows (appended) and change one existing row's share at party 1 only (party 0's share row is
        # untouched, so only party 1's checksum misses): exactly those 4 get new masks at BOTH parties
        g_new = _unit(rng, 3, D)
        n0, n1 = split(encode_trunc(g_new), rng)
        g0b, g1b = np.concatenate([g0, n0]), np.concatenate([g1, n1])
        row7 = _unit(rng, D)
        g1b[7] = encode_trunc(row7) - g0b[7]  # wraps in the ring, like any share
        assert np.array_equal(g0b[:n], g0) and not np.array_equal(g1b[7], g1[7])
        g2 = np.concatenate([g, g_new])
        g2[7] = row7
        lab2 = np.concatenate([labels, np.arange(500, 503, dtype=np.int64)])
        q = 0.85 * g_new[1] + 0.15 * _unit(rng, D)
        q /= np.linalg.norm(q)
        out, stats = _run_shared(cluster, q, (g0b, g1b), lab2, 0.5, rng)
        assert out == _plain(q, g2, lab2, 0.5) == 501
        assert stats[0]["setup_rows"] == 4 and stats[1]["setup_rows"] == 4
        # a batch after the enrolment: the float64 copy of the masks (batched products) grew with the new rows
        qb = np.stack([0.85 * g2[j] + 0.15 * _unit(rng, D) for j in (7, 41, 42, 5)])
        qb /= np.linalg.norm(qb, axis=1, keepdims=True)
        outs, stats = _run_shared(cluster, qb, (g0b, g1b), lab2, 0.5, rng)
        assert outs == [_plain(qb[j], g2, lab2, 0.5) for j in range(4)] == [108, 501, 502, 106]
        assert stats[0]["setup_rows"] == 0
        # a deleted row (subset of the gallery) reuses the remaining masks
        keep = np.r_[0:10, 11:n + 3]
        q = 0.85 * g2[20] + 0.15 * _unit(rng, D)
        q /= np.linalg.norm(q)
        out, stats = _run_shared(cluster, q, (g0b[keep], g1b[keep]), lab2[keep], 0.5, rng)
        assert out == _plain(q, g2[keep], lab2[keep], 0.5) == int(lab2[20])
        assert stats[0]["setup_rows"] == 0


@pytest.mark.slow
def test_engine_remasks_after_a_restart_and_resets_a_full_store(tmp_path) -> None:
    """Two paths the test above does not reach: a new engine generation (party 1 restarted) masks every row
    again with fresh masks, and a store that would outgrow max(2n, n + 4096) slots is reset at both parties
    and the dealer, all rows re-masked (setup_rows == n although only some rows changed)."""
    rng = np.random.default_rng(23)
    n, thr = 1000, 0.5
    g = _unit(rng, n, D)
    labels = np.arange(1, n + 1, dtype=np.int64)
    shares = split(encode_trunc(g), rng)

    def identify(gallery_shares: tuple[np.ndarray, np.ndarray], row: int) -> list:
        q = 0.85 * g[row] + 0.15 * _unit(rng, D)
        q /= np.linalg.norm(q)
        out, stats = _run_shared(cluster, q, gallery_shares, labels, thr, rng)
        assert out == _plain(q, g, labels, thr) == row + 1
        return [st["setup_rows"] for st in stats]

    with Cluster(tmp_path, **FAST) as cluster:
        cluster.wait_connected(90)
        assert identify(shares, 5) == [n, n]
        assert identify(shares, 6) == [0, 0]
        generation = cluster.status(0)["generation"]
        cluster.kill_party(1)
        cluster.start_party(1)
        cluster.wait_connected(90)
        assert cluster.status(0)["generation"] > generation
        assert identify(shares, 7) == [n, n]  # the new generation holds no mask: every row is masked again
        assert identify(shares, 8) == [0, 0]
        for i in range(4):  # re-shared galleries fill the store: 1000 + 4 * 1000 slots (limit 1000 + 4096)
            shares = split(encode_trunc(g), rng)
            assert identify(shares, 10 + i) == [n, n]
        changed = (shares[0].copy(), shares[1].copy())
        fresh = split(encode_trunc(g[:200]), rng)
        changed[0][:200], changed[1][:200] = fresh
        assert identify(changed, 300) == [n, n]  # 200 changed rows would overflow: reset, all re-masked
        assert identify(changed, 301) == [0, 0]  # and the new store serves the next job


@pytest.mark.slow
def test_a_delete_zeroes_the_mask_cache_and_the_rows_are_remasked(tmp_path) -> None:
    """Erasure (issue 9): after a committed delete a party drops every cached [E | A_i] row (E + A_i is a share
    of the row) and its resident snapshot; the next job re-masks the remaining rows in fresh slots at BOTH
    parties (party 1 never forgot: the per-row agreement makes it follow), with correct results."""
    rng = np.random.default_rng(31)
    n = 30
    g = _unit(rng, n, D)
    labels = np.arange(1, n + 1, dtype=np.int64)
    g0, g1 = split(encode_trunc(g), rng)
    with Cluster(tmp_path, **FAST) as cluster:
        cluster.wait_connected(90)
        q = 0.8 * g[4] + 0.2 * _unit(rng, D)
        q /= np.linalg.norm(q)
        for expected_setup in (n, 0):
            out, stats = _run_shared(cluster, q, (g0, g1), labels, 0.5, rng)
            assert out == 5 and stats[0]["setup_rows"] == expected_setup
        keep = np.r_[0:12, 13:n]  # row 12 deleted
        cluster.forget_rows(0)
        out, stats = _run_shared(cluster, q, (g0[keep], g1[keep]), labels[keep], 0.5, rng)
        assert out == 5
        assert stats[0]["setup_rows"] == n - 1 and stats[1]["setup_rows"] == n - 1
        out, stats = _run_shared(cluster, q, (g0[keep], g1[keep]), labels[keep], 0.5, rng)
        assert out == 5 and stats[0]["setup_rows"] == 0 and stats[1]["setup_rows"] == 0


def test_forget_zeroes_every_cached_row_and_keeps_the_slot_counter() -> None:
    import torch

    from secure.mpc.protocols.fixed_gallery import PartyGalleryCache

    cache = PartyGalleryCache(0)
    cache.stores[8] = torch.arange(1, 5 * 16 + 1, dtype=torch.long).reshape(5, 16)
    cache.used[8], cache.index[8] = 5, {123: 0, 456: 4}
    cache.last[8] = (torch.tensor([123]), torch.tensor([0]))
    cache.forget()
    assert int(cache.stores[8].abs().sum()) == 0 and cache.index[8] == {} and cache.last == {}
    assert cache.used[8] == 5  # slots are never reused: the next rows go to 5, 6, ...
