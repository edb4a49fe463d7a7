"""1:N secure search at scale: naive CrypTen vs the project's protocol vs plaintext numpy, in one run.

python bench/mpc_scale.py [--sizes 1000,10000,100000] [--d 128] [--reps 3] [--protocols naive,privface]
                          [--out docs/results/mpc_scale]

Protocols (``PROTOCOLS``): naive = CrypTen end to end (Beaver matmul + CrypTen's comparisons; the baseline);
fixed-gallery = the fixed-gallery scores + CrypTen's comparisons (ablation); privface = fixed-gallery scores +
the dealer-bits threshold/argmax (secure/mpc/protocols/compare.py), the service default.

Each protocol runs in its own local cluster (dealer + 2 parties, real processes, gloo on loopback, CPU).
Per N the gallery is shared ONCE (as the party server does: shares are stored at enrollment) and every query
is freshly shared. Reported per query:
* time: wall time at party 0, submit -> output share (includes the engine's hand-over to its worker process:
  an unchanged gallery snapshot is compared, not re-sent); ``mpc`` = time inside the worker's MPC circuit only;
* bytes / rounds per party: CrypTen's communicator statistics (its convention: an all_reduce counts the
  elements sent AND received, a broadcast from the dealer counts the elements received), dealer traffic included;
* fixed-gallery: the first query after the gallery is shared also opens the masks (setup), reported apart;
* correctness: every MPC output is compared with the plaintext decision on the same fixed-point inputs.
Writes <out>.json and <out>.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devtools.mpc_cluster import Cluster, encode_trunc, split
from secure.mpc.protocols.base import threshold_raw

THRESHOLD = 0.5
PROTOCOLS = {"naive": {"protocol": "naive", "compare": "crypten"},
             "fixed-gallery": {"protocol": "fixed-gallery", "compare": "crypten"},
             "privface": {"protocol": "fixed-gallery", "compare": "dealer-bits"}}
BASELINE, OURS = "naive", "privface"


def unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.normal(size=shape)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float64)


def fixed_point_decision(q_enc: np.ndarray, g_enc: np.ndarray, labels: np.ndarray, thr: float) -> int:
    raw = g_enc @ q_enc  # exact at these magnitudes (|raw| < 2^40)
    best = int(np.argmax(raw))
    return int(labels[best]) if raw[best] >= threshold_raw(thr) else 0


def float_decision(q: np.ndarray, g: np.ndarray, labels: np.ndarray, thr: float) -> int:
    s = g @ q
    best = int(np.argmax(s))
    return int(labels[best]) if s[best] >= thr else 0


def queries(rng: np.random.Generator, g: np.ndarray, count: int) -> list[np.ndarray]:
    out = []
    for i in range(count):
        q = unit(rng, g.shape[1])
        if i % 2 == 0:  # a genuine match every other query
            q = 0.8 * g[int(rng.integers(g.shape[0]))] + 0.2 * q
            q /= np.linalg.norm(q)
        out.append(q)
    return out


def plaintext_time(g: np.ndarray, qs: list[np.ndarray], labels: np.ndarray) -> float:
    g32 = g.astype(np.float32)
    times = []
    for _ in range(5):
        for q in qs:
            t0 = time.perf_counter()
            float_decision(q.astype(np.float32), g32, labels, THRESHOLD)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3, help="steady-state queries per (protocol, N)")
    ap.add_argument("--naive-max-reps-100k", type=int, default=2)
    ap.add_argument("--protocols", default="naive,privface", help=f"comma list of {sorted(PROTOCOLS)}")
    ap.add_argument("--shards", type=int, default=1, help="PRIVFACE_MPC_SHARDS for the privface protocol")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="per MPC process (3 processes share this machine; same for every protocol)")
    ap.add_argument("--naive-max-n", type=int, default=1_000_000, help="skip the naive baseline above this N")
    ap.add_argument("--batch", type=int, default=16, help="queries per MPC job for the batched runs (0: skip)")
    ap.add_argument("--batch-reps", type=int, default=2)
    ap.add_argument("--out", default="docs/results/mpc_scale")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    protocols = args.protocols.split(",")
    rng = np.random.default_rng(2026)
    galleries = {n: unit(rng, n, args.d) for n in sizes}
    labels = {n: np.arange(1, n + 1, dtype=np.int64) for n in sizes}
    shares = {n: split(encode_trunc(galleries[n]), rng) for n in sizes}
    qsets = {n: queries(rng, galleries[n], args.reps + 1) for n in sizes}
    bsets = {n: [np.stack(queries(rng, galleries[n], args.batch)) for _ in range(args.batch_reps + 1)]
             for n in sizes} if args.batch else {}
    results: dict = {"config": {"d": args.d, "sizes": sizes, "reps": args.reps, "threshold": THRESHOLD,
                                "cpu_count": os.cpu_count(), "machine": platform.machine(),
                                "python": platform.python_version(), "device": "cpu", "batch": args.batch,
                                "shards": args.shards, "torch_threads": args.torch_threads},
                     "plaintext": {}, "mpc": {}}
    for n in sizes:
        results["plaintext"][n] = plaintext_time(galleries[n], qsets[n], labels[n])
        print(f"plaintext n={n}: {results['plaintext'][n] * 1e3:.2f} ms/query", flush=True)

    for proto in protocols:
        t0 = time.time()
        extra = {"shards": args.shards} if proto == OURS and args.shards > 1 else {}
        with Cluster(None, op_timeout_s=300, connect_timeout_s=60, torch_threads=args.torch_threads,
                     **PROTOCOLS[proto], **extra) as cluster:
            cluster.wait_connected(180)
            print(f"[{proto}] cluster up in {time.time() - t0:.1f}s", flush=True)
            for n in sizes:
                if proto == "naive" and n > args.naive_max_n:
                    continue
                reps = args.reps
                if proto == "naive" and n >= 100_000:
                    reps = min(reps, args.naive_max_reps_100k)
                rows = []
                ge = encode_trunc(galleries[n])
                for i, q in enumerate(qsets[n][:reps + 1]):
                    out, el, stats = cluster.run_shared("identify", q, shares[n], labels[n], THRESHOLD, rng, timeout=600,
                                                          gallery_id=f"bench-{n}")
                    want = fixed_point_decision(encode_trunc(q), ge, labels[n], THRESHOLD)
                    rows.append({"elapsed_s": el, "mpc_s": stats[0]["mpc_s"], "stats": stats, "out": out,
                                 "want_fixed_point": want,
                                 "want_float": float_decision(q, galleries[n], labels[n], THRESHOLD),
                                 "setup_rows": stats[0]["setup_rows"]})
                    print(f"[{proto}] n={n} q{i}: {el:.3f}s (mpc {stats[0]['mpc_s']:.3f}s) "
                          f"bytes p0 {stats[0]['bytes'] / 1e6:.2f} MB p1 {stats[1]['bytes'] / 1e6:.2f} MB "
                          f"rounds {stats[0]['rounds']} setup_rows {stats[0]['setup_rows']} "
                          f"out {out} want {want} {'OK' if out == want else 'MISMATCH'}", flush=True)
                # the first query is a warm-up for naive and the mask setup for fixed-gallery
                steady = rows[1:]
                results["mpc"].setdefault(proto, {})[n] = {
                    "first": rows[0], "steady": steady,
                    "time_per_query_s": statistics.median(r["elapsed_s"] for r in steady),
                    "mpc_time_per_query_s": statistics.median(r["mpc_s"] for r in steady),
                    "bytes_per_party": [statistics.median(r["stats"][p]["bytes"] for r in steady) for p in (0, 1)],
                    "rounds_per_party": [statistics.median(r["stats"][p]["rounds"] for r in steady) for p in (0, 1)],
                    "all_correct": all(r["out"] == r["want_fixed_point"] for r in rows),
                    "agrees_with_float": all(r["out"] == r["want_float"] for r in rows),
                }
                if args.batch:
                    brows: list[dict[str, Any]] = []
                    breps = 1 if (proto == "naive" and n >= 100_000) else args.batch_reps
                    if proto == OURS:  # once per snapshot, like the mask set-up: the float64 copy of the masks
                        _, el, _ = cluster.run_shared("identify", bsets[n][-1], shares[n], labels[n], THRESHOLD, rng,
                                                      timeout=600, gallery_id=f"bench-{n}")
                        results["mpc"][proto][n]["first_batch_s"] = el
                        print(f"[{proto}] n={n} first batch (builds the float64 copy): {el:.3f}s", flush=True)
                    for i, qb in enumerate(bsets[n][:breps]):
                        outs, el, stats = cluster.run_shared("identify", qb, shares[n], labels[n], THRESHOLD, rng,
                                                           timeout=600, gallery_id=f"bench-{n}")
                        wants = [fixed_point_decision(encode_trunc(q), ge, labels[n], THRESHOLD) for q in qb]
                        brows.append({"elapsed_s": el, "mpc_s": stats[0]["mpc_s"], "stats": stats, "out": outs,
                                      "want_fixed_point": wants})
                        print(f"[{proto}] n={n} batch {len(qb)} #{i}: {el:.3f}s ({el / len(qb):.3f}s/query) "
                              f"bytes p0 {stats[0]['bytes'] / 1e6:.2f} MB rounds {stats[0]['rounds']} "
                              f"{'OK' if outs == wants else 'MISMATCH'}", flush=True)
                    b = args.batch
                    crows: list[dict[str, Any]] = []
                    if proto == OURS:  # the service's case: concurrent single-query requests, coalesced by the worker
                        for i, qb in enumerate(bsets[n][:breps]):
                            res = cluster.run_shared_many("identify", list(qb), shares[n], labels[n], THRESHOLD, rng,
                                                          timeout=600, gallery_id=f"bench-{n}")
                            wants = [fixed_point_decision(encode_trunc(q), ge, labels[n], THRESHOLD) for q in qb]
                            makespan = max(r[1] for r in res)  # all submitted at once: the last answer's wait
                            crows.append({"makespan_s": makespan, "out": [r[0] for r in res], "want_fixed_point": wants,
                                          "coalesced": [r[2][0].get("coalesced", 1) for r in res]})
                            print(f"[{proto}] n={n} {len(qb)} concurrent jobs #{i}: {makespan:.3f}s "
                                  f"coalesced {crows[-1]['coalesced']} "
                                  f"{'OK' if crows[-1]['out'] == wants else 'MISMATCH'}", flush=True)
                    results["mpc"][proto][n]["batch"] = {
                        "size": b, "runs": brows,
                        "time_per_query_s": statistics.median(r["elapsed_s"] for r in brows) / b,
                        "queries_per_s": b / statistics.median(r["elapsed_s"] for r in brows),
                        "bytes_per_party_per_query": [statistics.median(r["stats"][p]["bytes"] for r in brows) / b
                                                      for p in (0, 1)],
                        "rounds_per_job": [statistics.median(r["stats"][p]["rounds"] for r in brows) for p in (0, 1)],
                        "all_correct": all(r["out"] == r["want_fixed_point"] for r in brows),
                    }
                    if crows:
                        results["mpc"][proto][n]["concurrent"] = {
                            "size": b, "runs": crows,
                            "queries_per_s": b / statistics.median(r["makespan_s"] for r in crows),
                            "all_correct": all(r["out"] == r["want_fixed_point"] for r in crows)}
    write(results, Path(args.out))


def write(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))
    out.with_suffix(".md").write_text("\n".join(table_lines(results)) + "\n")
    print("\n".join(table_lines(results)))


def table_lines(results: dict) -> list[str]:
    """Markdown tables: one row per (N, protocol), then the privface-vs-naive ratios and the batched runs."""
    cfg, mpc = results["config"], results["mpc"]
    sizes = [int(n) for n in cfg["sizes"]]
    shards = int(cfg.get("shards", 1))
    lines = [(f"# MPC 1:N scale benchmark (d = {cfg['d']}, {cfg['cpu_count']} CPU cores, {cfg['device']}, "
              "2 parties + dealer on loopback" + (f"; {OURS} with {shards} shards" if shards > 1 else "") + ")"), "",
             ("Command: `python bench/mpc_scale.py` (raw data: `mpc_scale.json`). Time = wall time per query at "
              "party 0 (submit -> output share), median of the steady-state queries; `mpc` = inside the MPC "
              "circuit. Bytes/rounds per party: sent + received between the parties plus what the dealer sends "
              "(CrypTen's convention). First query = warm-up (naive) or mask setup (fixed-gallery scores)."), "",
             "| N | protocol | time/query (mpc) | first query | MB/party/query | rounds | queries/s | correct |",
             "|---|---|---|---|---|---|---|---|"]
    for n in sizes:
        lines.append(f"| {n:,} | plaintext (numpy, float32) | {results['plaintext'][_key(results['plaintext'], n)] * 1e3:.2f} ms "
                     "| – | – | – | – | – |")
        for proto, by_n in mpc.items():
            r = by_n.get(_key(by_n, n))
            if not r:
                continue
            lines.append(f"| {n:,} | {proto} | {r['time_per_query_s']:.3f} s ({r['mpc_time_per_query_s']:.3f}) | "
                         f"{r['first']['elapsed_s']:.3f} s | {max(r['bytes_per_party']) / 1e6:.2f} | "
                         f"{int(max(r['rounds_per_party']))} | {1 / r['time_per_query_s']:.2f} | "
                         f"{'yes' if r['all_correct'] else 'NO'} |")
    base, ours = mpc.get(BASELINE, {}), mpc.get(OURS, {})
    if base and ours:
        lines += ["", f"{OURS} vs {BASELINE} (same run):", "", "| N | speed-up | bytes ratio | rounds ratio |",
                  "|---|---|---|---|"]
        for n in sizes:
            b, o = base.get(_key(base, n)), ours.get(_key(ours, n))
            if b and o:
                lines.append(f"| {n:,} | {b['time_per_query_s'] / o['time_per_query_s']:.1f}x | "
                             f"1/{max(b['bytes_per_party']) / max(o['bytes_per_party']):.1f} | "
                             f"1/{max(b['rounds_per_party']) / max(o['rounds_per_party']):.1f} |")
    if cfg.get("batch"):
        bsz = cfg["batch"]
        lines += ["", f"Batched: {bsz} queries in one MPC job (one knockout over [N, {bsz}]). Concurrent: {bsz} "
                  "single-query jobs submitted at once, as concurrent requests reach a party server; the worker "
                  f"coalesces the queued ones (PRIVFACE_MPC_COALESCE_MAX); q/s = {bsz} / time to the last answer.", "",
                  f"| N | protocol | batch-1 q/s | batch-{bsz} q/s | gain | {bsz} concurrent q/s (gain) | "
                  f"batch-{bsz} MB/party/query | rounds per job | correct |", "|---|---|---|---|---|---|---|---|---|"]
        for n in sizes:
            for proto, by_n in mpc.items():
                r = by_n.get(_key(by_n, n))
                if not r or "batch" not in r:
                    continue
                bt = r["batch"]
                q1 = 1 / r["time_per_query_s"]
                ct = r.get("concurrent")
                conc = (f"{ct['queries_per_s']:.2f} ({ct['queries_per_s'] / q1:.1f}x)"
                        + ("" if ct["all_correct"] else " WRONG")) if ct else "–"
                lines.append(f"| {n:,} | {proto} | {q1:.2f} | {bt['queries_per_s']:.2f} | "
                             f"{bt['queries_per_s'] / q1:.1f}x | {conc} | {max(bt['bytes_per_party_per_query']) / 1e6:.3f} | "
                             f"{int(max(bt['rounds_per_job']))} | {'yes' if bt['all_correct'] else 'NO'} |")
    lines += ["", "Correct = every MPC output equals the plaintext decision on the same 16-bit fixed-point inputs."]
    return lines


def _key(d: dict[Any, Any], n: int) -> int | str:
    """JSON round trips turn int keys into strings."""
    return n if n in d else str(n)


if __name__ == "__main__":
    main()
