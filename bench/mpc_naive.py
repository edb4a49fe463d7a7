"""Time the MPC engine (naive CrypTen circuit, 2 parties + TTP dealer, loopback, real processes).

python bench/mpc_naive.py [--d 128] [--sizes 100,1000] [--reps 3]
Prints per-job wall time at party 0 (submit -> share), for verify (n=5) and identify at each n.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devtools.mpc_cluster import Cluster  # noqa: E402


def unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--sizes", default="100,1000")
    ap.add_argument("--verify-n", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(7)
    cases = [("verify", args.verify_n)] + [("identify", int(n)) for n in args.sizes.split(",")]
    t0 = time.time()
    with Cluster(op_timeout_s=30, connect_timeout_s=60) as cluster:
        cluster.wait_connected(120)
        print(f"cluster up in {time.time() - t0:.1f}s (dealer + 2 parties, loopback, CPU)", flush=True)
        for kind, n in cases:
            q = unit(rng, args.d)
            g = unit(rng, n, args.d)
            labels = np.arange(1, n + 1)
            times = []
            for _ in range(args.reps):
                out, el = cluster.run(kind, q, g, labels, 0.3, rng, timeout=300)
                times.append(el)
            print(f"{kind:8s} n={n:6d} d={args.d}: median {statistics.median(times) * 1000:8.1f} ms "
                  f"(min {min(times) * 1000:.1f}, max {max(times) * 1000:.1f}, {args.reps} runs)", flush=True)


if __name__ == "__main__":
    main()
