"""Verify jobs per second at the MPC engine: queued verify jobs coalesced into one batched job, on vs off.

Two real clusters (dealer + two parties each, ``devtools/mpc_cluster.py``), one with PRIVFACE_MPC_COALESCE_VERIFY
on (the default) and one with it off, both otherwise at their defaults (dealer-bits comparison, TTP, one torch
thread). They take turns: each round submits ``--concurrent`` verify jobs at once to one cluster, then to the
other (as concurrent requests reach the parties; the gateway keeps at most PRIVFACE_PARTY_JOBS_IN_FLIGHT = 8 in
flight), and times the last answer. Every job has its own 1-5 unit rows (a claimed subject's templates), half the
queries genuine; each answer is checked against plaintext, so coalescing must not change a decision.

    python -m bench.verify_coalescing [--concurrent 8] [--rounds 6] [--out docs/results/verify_coalescing.json]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.report import emit
from devtools.mpc_cluster import Cluster, encode_trunc, split
from secure.mpc.protocols.base import threshold_raw

D = 128
THRESHOLD = 0.5
SETTINGS = {"coalesced": {"coalesce_verify": "1"}, "alone": {"coalesce_verify": "0"}}
COMMON = {"torch_threads": 1, "heartbeat_s": 1.0}


def _unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def verify_jobs(rng: np.random.Generator, count: int) -> tuple[list[Any], list[int]]:
    """``count`` verify jobs for ``Cluster.run_jobs`` and their plaintext answers."""
    jobs, want = [], []
    for i in range(count):
        rows = _unit(rng, 1 + int(rng.integers(5)), D)
        query = _unit(rng, D)
        if i % 2 == 0:
            query = 0.8 * rows[int(rng.integers(len(rows)))] + 0.2 * query
            query /= np.linalg.norm(query)
        jobs.append(("verify", query, split(encode_trunc(rows), rng), np.arange(1, len(rows) + 1), None))
        want.append(int((encode_trunc(rows) @ encode_trunc(query)).max() >= threshold_raw(THRESHOLD)))
    return jobs, want


def one_round(cluster: Cluster, rng: np.random.Generator, count: int) -> dict[str, Any]:
    jobs, want = verify_jobs(rng, count)
    t0 = time.perf_counter()
    results = cluster.run_jobs(jobs, THRESHOLD, rng, timeout=120)
    seconds = time.perf_counter() - t0
    got = [int(r[0]) for r in results]  # type: ignore[arg-type]
    return {"seconds": seconds, "verifies_per_s": count / seconds, "wrong": sum(a != b for a, b in zip(got, want)),
            "coalesced": [int((r[2][0] or {}).get("coalesced", 1)) for r in results]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)  # test data, not protection
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        clusters = {name: Cluster(Path(tmp) / name, **COMMON, **extra).start() for name, extra in SETTINGS.items()}
        try:
            for cluster in clusters.values():
                cluster.wait_connected(120)
            for name, cluster in clusters.items():  # warm-up: sessions and dealer links, not timed
                one_round(cluster, rng, 2)
            for _ in range(args.rounds):
                for name, cluster in clusters.items():
                    rounds[name].append(one_round(cluster, rng, args.concurrent))
        finally:
            for cluster in clusters.values():
                cluster.close()
    summary = {name: {"verifies_per_s_median": statistics.median(r["verifies_per_s"] for r in rs),
                      "seconds_median": statistics.median(r["seconds"] for r in rs),
                      "wrong_answers": sum(r["wrong"] for r in rs),
                      "largest_group": max(max(r["coalesced"]) for r in rs)} for name, rs in rounds.items()}
    ratio = summary["coalesced"]["verifies_per_s_median"] / summary["alone"]["verifies_per_s_median"]
    report = {"concurrent": args.concurrent, "rounds": args.rounds, "rows_per_job": "1-5", "d": D,
              "summary": summary, "ratio_coalesced_to_alone": ratio, "rounds_detail": rounds}
    emit(report, args.out)
    return report


if __name__ == "__main__":
    main()
