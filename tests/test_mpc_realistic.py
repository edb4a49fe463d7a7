"""Regression: face-like galleries (every score high and close together, or all low) through both score
protocols and both comparison circuits. Random unit vectors give scores near 0 and hide errors that show up with real templates."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from devtools.mpc_cluster import Cluster

pytestmark = pytest.mark.slow
FAST = {"op_timeout_s": 8, "connect_timeout_s": 20, "heartbeat_s": 0.5, "pair_wait_s": 1.0, "retry_backoff_s": 0.2}
THRESHOLD = 0.373  # model v0's served threshold


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module", params=[("fixed-gallery", "dealer-bits"), ("naive", "dealer-bits"),
                                        ("naive", "crypten")], ids=lambda p: "+".join(p))
def cluster(request, tmp_path_factory) -> Iterator[Cluster]:
    scores, compare = request.param
    c = Cluster(tmp_path_factory.mktemp(f"mpc-{scores}-{compare}"), protocol=scores, compare=compare, **FAST).start()
    try:
        c.wait_connected(90)
        yield c
    finally:
        c.close()


@pytest.mark.parametrize("n", [2, 3, 7])
def test_identify_with_close_high_scores(cluster: Cluster, n: int) -> None:
    rng = np.random.default_rng(n)
    labels = np.arange(3, 3 + n)
    for trial in range(8):
        person = unit(rng.normal(size=128))
        gallery = unit(person + 0.5 * unit(rng.normal(size=(n, 128))))  # the same person enrolled n times
        genuine = trial % 2 == 0
        probe = unit(person + 0.3 * unit(rng.normal(size=128))) if genuine else unit(rng.normal(size=128))
        scores = gallery @ probe
        if np.min(np.abs(scores - THRESHOLD)) < 1e-3 or (genuine and np.sort(scores)[-2] > scores.max() - 1e-3):
            continue  # a fixed-point near-tie: documented, not tested here
        best = int(np.argmax(scores))
        expect = int(labels[best]) if scores[best] >= THRESHOLD else 0
        got, _ = cluster.run("identify", probe, gallery, labels, THRESHOLD, rng)
        assert got == expect, (trial, np.round(scores, 4))
        got, _ = cluster.run("verify", probe, gallery, labels, THRESHOLD, rng)
        assert got == int(scores.max() >= THRESHOLD), (trial, np.round(scores, 4))
