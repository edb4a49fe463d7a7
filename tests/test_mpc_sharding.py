"""Gallery sharding with real processes: two shards (two dealers, two engine pairs per party) on one machine.

Each party process runs a ShardedEngine; identify splits the rows by label % 2, runs both shard knockouts in
parallel and merges the winners in MPC. Decisions must equal the plaintext ones on the same fixed-point inputs.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from devtools.mpc_cluster import Cluster, encode_trunc, split
from devtools.net import free_port, is_free
from secure.mpc.protocols.base import threshold_raw
from secure.mpc.settings import MpcSettings
from secure.mpc.sharding import shard_of

pytestmark = pytest.mark.slow
FAST = {"op_timeout_s": 8, "connect_timeout_s": 20, "heartbeat_s": 0.5, "pair_wait_s": 1.0, "retry_backoff_s": 0.2}
D = 128


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    port = free_port()
    while not is_free(port + 1):  # shard 1 uses port + 1
        port = free_port()
    c = Cluster(tmp_path_factory.mktemp("mpc-shards"), master_port=port, shards=2, **FAST).start()
    try:
        c.wait_connected(120)
        yield c
    finally:
        c.close()


def plain(q: np.ndarray, g: np.ndarray, labels: np.ndarray, thr: float) -> int:
    raw = encode_trunc(g) @ encode_trunc(q)
    best = int(np.argmax(raw))
    return int(labels[best]) if raw[best] >= threshold_raw(thr) else 0


def test_two_shards_are_up(cluster: Cluster) -> None:
    st = cluster.status(0)
    assert st["connected"] and len(st["shards"]) == 2


@pytest.mark.parametrize("winner_label", [40, 41, 7])  # even -> shard 0, odd -> shard 1
def test_identify_over_two_shards_equals_plaintext(cluster: Cluster, winner_label: int) -> None:
    rng = np.random.default_rng(winner_label)
    labels = np.arange(1, 201)
    person = unit(rng.normal(size=D))
    g = unit(rng.normal(size=(200, D)))
    g[winner_label - 1] = unit(person + 0.4 * unit(rng.normal(size=D)))
    g[(winner_label + 2) % 200] = unit(person + 0.9 * unit(rng.normal(size=D)))  # runner-up on the same shard
    q = unit(person + 0.3 * unit(rng.normal(size=D)))
    shares = split(encode_trunc(g), rng)
    for thr in (0.5, 0.99):
        out, _, stats = cluster.run_shared("identify", q, shares, labels, thr, rng)
        assert out == plain(q, g, labels, thr)
    assert out == 0 and plain(q, g, labels, 0.5) == winner_label


def test_batched_identify_and_verify_with_shards(cluster: Cluster) -> None:
    rng = np.random.default_rng(3)
    labels = np.arange(10, 70)
    g = unit(rng.normal(size=(60, D)))
    qs = np.stack([unit(g[i] + 0.3 * unit(rng.normal(size=D))) for i in (0, 1, 2, 33)] + [unit(rng.normal(size=D))])
    shares = split(encode_trunc(g), rng)
    outs, _, _ = cluster.run_shared("identify", qs, shares, labels, 0.6, rng)
    assert outs == [plain(q, g, labels, 0.6) for q in qs] and outs[:4] == [10, 11, 12, 43] and outs[4] == 0
    out, _ = cluster.run("verify", qs[0], g[:3], labels[:3], 0.6, rng)  # verify runs on shard 0 alone
    assert out == 1


def test_concurrent_identify_over_two_shards(cluster: Cluster) -> None:
    """Many queries at once: every shard job reaches its engine at once at both parties (no bounded pool whose
    order could differ between them), so none is skipped, and every answer equals plaintext."""
    rng = np.random.default_rng(5)
    labels = np.arange(1, 301)
    g = unit(rng.normal(size=(300, D)))
    qs = [unit(g[i] + 0.3 * unit(rng.normal(size=D))) for i in range(0, 300, 30)] + [unit(rng.normal(size=D))]
    shares = split(encode_trunc(g), rng)
    results = cluster.run_shared_many("identify", qs, shares, labels, 0.6, rng, gallery_id="concurrent")
    assert [r[0] for r in results] == [plain(q, g, labels, 0.6) for q in qs]
    assert [r[0] for r in results][:10] == list(range(1, 301, 30))


def test_named_snapshot_is_split_into_shards_once() -> None:
    """A gallery_id promises the same rows and labels, so its shard split is reused; no id, no reuse."""
    from secure.mpc.engine import MatchJob
    from secure.mpc.sharding import ShardedEngine

    engine = ShardedEngine(0, MpcSettings(shards=2))  # not started: no processes
    g = np.arange(5 * 4, dtype=np.int64).reshape(5, 4)
    labels = np.array([10, 11, 12, 13, 14])

    def job(gid: str | None) -> MatchJob:
        return MatchJob(job_id="j", kind="identify", query_share=np.zeros(4, dtype=np.int64),
                        gallery_share=g.copy(), labels=labels.copy(), threshold=0.5, gallery_id=gid)

    first = engine._split(job("A"))
    assert [(k, r.tolist(), lab.tolist()) for k, r, lab in first] == [
        (0, g[[0, 2, 4]].tolist(), [10, 12, 14]), (1, g[[1, 3]].tolist(), [11, 13])]
    assert engine._split(job("A")) is first
    assert engine._split(job("B")) is not first
    assert engine._split(job(None)) is not engine._split(job(None))


def test_shard_settings_and_guards() -> None:
    s = MpcSettings(shards=3, master_port=30000, shard_addrs="10.0.0.1, 10.0.0.2,10.0.0.3")
    parts = s.shard_settings()
    assert [p.master_port for p in parts] == [30000, 30001, 30002]
    assert [p.master_addr for p in parts] == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    assert all(p.shards == 1 for p in parts)
    with pytest.raises(ValueError, match="names 2 addresses"):
        MpcSettings(shards=3, shard_addrs="a,b").shard_settings()
    with pytest.raises(ValueError, match="dealer-bits"):
        MpcSettings(shards=2, compare="crypten")
    assert list(shard_of(np.array([1, 2, 3, 4]), 2)) == [1, 0, 1, 0]


def test_named_gallery_snapshots_resident_and_replaced(cluster: Cluster) -> None:
    """gallery_id (as the party server sends it): the same id reuses the resident snapshot and its row keys;
    a new id, or a verify job in between, sends and masks the new rows."""
    rng = np.random.default_rng(11)
    labels = np.arange(1, 41)
    g1, g2 = unit(rng.normal(size=(40, D))), unit(rng.normal(size=(40, D)))
    s1, s2 = split(encode_trunc(g1), rng), split(encode_trunc(g2), rng)
    q1 = unit(g1[4] + 0.2 * unit(rng.normal(size=D)))
    q2 = unit(g2[17] + 0.2 * unit(rng.normal(size=D)))
    runs = [(q1, s1, "A", g1), (q1, s1, "A", g1), (q2, s2, "B", g2), (q1, s1, "A", g1)]
    for i, (q, sh, gid, g) in enumerate(runs):
        if i == 3:
            assert cluster.run("verify", q1, g1[:2], labels[:2], 0.6, rng)[0] == 0
        out, _, _ = cluster.run_shared("identify", q, sh, labels, 0.6, rng, gallery_id=gid)
        assert out == plain(q, g, labels, 0.6) and out in (5, 18)


def test_verify_between_identifies_does_not_reuse_stale_row_keys(cluster: Cluster) -> None:
    """Regression (caught by CI): a verify job made a one-row snapshot resident; the next identify on the very
    same shares was marked "same gallery" and reused the row keys of the identify before it (another row)."""
    rng = np.random.default_rng(12)
    x, y = unit(rng.normal(size=(1, D))), unit(rng.normal(size=(1, D)))
    sx, sy = split(encode_trunc(x), rng), split(encode_trunc(y), rng)
    qx, qy = unit(x[0] + 0.1 * unit(rng.normal(size=D))), unit(y[0] + 0.1 * unit(rng.normal(size=D)))
    label = np.array([8])  # even: shard 0, where verify jobs run too
    assert cluster.run_shared("identify", qx, sx, label, 0.6, rng, gallery_id="X")[0] == 8
    assert cluster.run_shared("verify", qy, sy, label, 0.6, rng)[0] == 1
    assert cluster.run_shared("identify", qy, sy, label, 0.6, rng, gallery_id="Y")[0] == 8
    assert cluster.run_shared("identify", qx, sy, label, 0.6, rng, gallery_id="Y")[0] == 0
