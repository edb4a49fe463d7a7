"""A match job only one party got (its peer refused it: the case the gateway's precheck guards against, now sent
only after a refusal, secure/precheck.py) costs the jobs behind it at most pair_wait_s, and the engine goes on.

Real processes: the dealer and two MPC parties (devtools/mpc_cluster.py). Party 0 announces the oldest job in its
queue; party 1 waits up to pair_wait_s for the same id, then both skip it. A job only party 1 got is never
announced and ends at its own timeout; it delays nothing.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from devtools.mpc_cluster import Cluster, encode_trunc, split

D = 128
PAIR_WAIT_S = 2.0
FAST = {"op_timeout_s": 20, "connect_timeout_s": 30, "heartbeat_s": 0.5, "pair_wait_s": PAIR_WAIT_S,
        "retry_backoff_s": 0.2, "torch_threads": 1}


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.slow
def test_a_job_only_one_party_got_delays_the_next_by_at_most_pair_wait(tmp_path) -> None:
    rng = np.random.default_rng(23)
    gallery = _unit(rng.normal(size=(64, D)))
    labels = np.arange(1, 65, dtype=np.int64)
    shares = split(encode_trunc(gallery), rng)
    probe = _unit(0.8 * gallery[5] + 0.2 * _unit(rng.normal(size=D)))  # label 6
    job = ("identify", probe, shares, labels, None)
    with Cluster(tmp_path, **FAST) as cluster:
        cluster.wait_connected(90)
        cluster.run_jobs([job], 0.5, rng)  # warm-up
        alone = min(cluster.run_jobs([job], 0.5, rng)[0][1] for _ in range(3))

        # only party 0 got it: announced first, party 1 waits PAIR_WAIT_S for it, both skip it
        orphan = cluster.submit_async(0, "orphan-0", "identify", cluster.write_job(probe, gallery, labels, rng)[0],
                                      0.5, timeout=30)
        (value, behind_0, _), = cluster.run_jobs([job], 0.5, rng)
        skipped = cluster.result(orphan, 60)

        # only party 1 got it: never announced, it ends at its own timeout; the next job does not wait for it
        started = time.monotonic()
        orphan = cluster.submit_async(1, "orphan-1", "identify", cluster.write_job(probe, gallery, labels, rng)[1],
                                      0.5, timeout=5)
        (value_1, behind_1, _), = cluster.run_jobs([job], 0.5, rng)
        expired = cluster.result(orphan, 60)
        expired_after = time.monotonic() - started

    assert value == value_1 == 6  # the engine answers the next jobs correctly
    assert "error" in skipped and "error" in expired, (skipped, expired)
    assert behind_0 <= alone + PAIR_WAIT_S + 1.5, (alone, behind_0)  # not the orphan's 30 s timeout
    assert behind_1 <= alone + 1.5, (alone, behind_1)
    assert expired_after < 5 + 10
    print(f"next job: alone {alone:.2f} s, behind a party-0 orphan {behind_0:.2f} s, "
          f"behind a party-1 orphan {behind_1:.2f} s")
