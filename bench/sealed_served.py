"""Sealed mode vs gateway mode, served, in the same run (issue 12): enroll + verify latency, MPC bytes and rounds.

    python -m bench.sealed_served --pairs-per-fold 10 --out var/sealed/served

One real stack (``devtools.localstack``: gateway, two parties, dealer; the bundled models). For each held-out LFW
View-2 pair of folds 6-10 (evaluation only: nothing here is tuned), the SDK makes the left photo's noised features
(aligned faces, so face detection, the same in both modes, is left out) and enrolls them, then verifies the right
photo: first with the tenant in gateway mode, then in sealed mode (``PUT /v1/admin/tenant/mode``), alternating per
pair so that both modes see the same load. Latency is the SDK call's wall time (sealing included in sealed mode);
bytes and rounds are each party's MPC counters per job (its log line ``mpc job ...``). The load average is recorded
before and after: this machine is shared, and latency depends on it; bytes and rounds do not.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from client.features import encode_features
from client.sdk import PrivfaceClient
from common.paths import PROJECT_ROOT
from devtools.localstack import NO_ABUSE_LIMITS, LocalStack
from inference.lfw import fold_pairs, images_outside_pairs, lfw_dir, load_many
from inference.transform import OsNoise, TransformSpec

JOB_LINE = re.compile(r"mpc job (\S+) \((\w+), (\d+) rows\): (\d+) rounds, (\d+) bytes")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def jobs(stack: LocalStack, rank: int) -> dict[str, tuple[str, int, int]]:
    """job id -> (kind, rounds, bytes) at one party, from its log."""
    found = {}
    for match in JOB_LINE.finditer(stack.log(f"party{rank}")):
        found[match.group(1)] = (match.group(2), int(match.group(4)), int(match.group(5)))
    return found


def set_mode(stack: LocalStack, key: str, mode: str) -> TransformSpec:
    auth = {"Authorization": f"Bearer {key}"}
    response = httpx.put(stack.url + "/v1/admin/tenant/mode", json={"mode": mode}, headers=auth, timeout=60)
    response.raise_for_status()
    served = httpx.get(stack.url + "/v1/transforms", headers=auth, timeout=60).json()[0]
    return TransformSpec.from_dict(served["spec"])


def run_mode(stack: LocalStack, key: str, mode: str, left: np.ndarray, right: np.ndarray) -> dict[str, Any]:
    """Enroll ``left``, verify ``right`` in ``mode``; wall times and the job ids' party counters."""
    spec = set_mode(stack, key, mode)
    with PrivfaceClient(stack.url, key, timeout=300, retries=0, sealed_pins=stack.sealed_pins,
                        require_sealed=mode == "sealed") as client:
        subject = client.create_subject()["id"]
        enrolled = encode_features(spec.apply(left, OsNoise()), spec)
        probe = encode_features(spec.apply(right, OsNoise()), spec)
        before = set(jobs(stack, 0))
        t0 = time.perf_counter()
        served = client.enroll_features(subject, enrolled)["model_version"]
        t1 = time.perf_counter()
        match = client.verify_features(subject, probe)
        t2 = time.perf_counter()
        identified = client.identify_features(encode_features(spec.apply(right, OsNoise()), spec))
        t3 = time.perf_counter()
    new = {rank: {j: v for j, v in jobs(stack, rank).items() if j not in before} for rank in (0, 1)}
    verify_jobs = [j for j, v in new[0].items() if v[0] == "verify"]
    identify_jobs = [j for j, v in new[0].items() if v[0] == "identify"]
    return {"model_version": served, "enroll_s": t1 - t0, "verify_s": t2 - t1, "match": match,
            "identify_s": t3 - t2, "identified_self": identified == subject,
            "identify_rounds_bytes": [new[r][identify_jobs[-1]][1:] for r in (0, 1)] if identify_jobs else None,
            "verify_rounds": [new[r][verify_jobs[-1]][1] for r in (0, 1)] if verify_jobs else None,
            "verify_bytes": [new[r][verify_jobs[-1]][2] for r in (0, 1)] if verify_jobs else None,
            "enroll_jobs": [v for v in new[0].values() if v[0] == "embed"]}


def enroll_fillers(stack: LocalStack, key: str, mode: str, faces: np.ndarray, threads: int = 4) -> float:
    """Fill ``mode``'s gallery with one template per face (people in no View-2 fold); seconds it took."""
    spec = set_mode(stack, key, mode)

    def enroll_share(share: np.ndarray) -> None:
        with PrivfaceClient(stack.url, key, timeout=300, retries=3, sealed_pins=stack.sealed_pins,
                            require_sealed=mode == "sealed") as client:
            for face in share:
                subject = client.create_subject()["id"]
                client.enroll_features(subject, encode_features(spec.apply(face, OsNoise()), spec))

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(enroll_share, np.array_split(faces, threads)))
    return time.perf_counter() - started


def summary(rows: list[dict[str, Any]], same: list[bool]) -> dict[str, Any]:
    verify = [r["verify_s"] for r in rows]
    identify = [r["identify_s"] for r in rows]
    enroll = [r["enroll_s"] for r in rows]
    with_jobs = [r for r in rows if r["verify_rounds"]]
    return {"model_versions": sorted({r["model_version"] for r in rows}),  # what the gateway served, per its answers
            "verify_s_p50": statistics.median(verify), "verify_s_p95": percentile(verify, 0.95),
            "enroll_s_p50": statistics.median(enroll), "enroll_s_p95": percentile(enroll, 0.95),
            "identify_s_p50": statistics.median(identify), "identify_s_p95": percentile(identify, 0.95),
            "identify_rounds_bytes_last": next((r["identify_rounds_bytes"] for r in reversed(rows)
                                                if r["identify_rounds_bytes"]), None),
            "genuine_identified_as_self": f"{sum(r['identified_self'] for r, s in zip(rows, same) if s)} of {sum(same)}",
            "verify_rounds_party0_party1": with_jobs[0]["verify_rounds"] if with_jobs else None,
            "verify_bytes_party0_party1": with_jobs[0]["verify_bytes"] if with_jobs else None,
            "rounds_bytes_identical_across_pairs": len({json.dumps([r["verify_rounds"], r["verify_bytes"]])
                                                        for r in with_jobs}) == 1,
            "accuracy_at_served_threshold": float(np.mean([r["match"] == s for r, s in zip(rows, same)])),
            "genuine_accepted": f"{sum(r['match'] for r, s in zip(rows, same) if s)} of {sum(same)}",
            "impostors_refused": f"{sum(not r['match'] for r, s in zip(rows, same) if not s)} of {len(same) - sum(same)}"}


def filler_photos(lfw: Path, count: int) -> list[str]:
    """The first photo of ``count`` people in no View-2 fold."""
    first: dict[str, str] = {}
    for path in images_outside_pairs(lfw):
        first.setdefault(path.split("/")[0], path)
    if len(first) < count:
        raise SystemExit(f"only {len(first)} people outside View 2; --gallery {count} is too many")
    return list(first.values())[:count]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs-per-fold", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("var/sealed/served"))
    ap.add_argument("--gallery", type=int, default=0, help="filler subjects enrolled in each mode first (people in "
                                                            "no View-2 fold): identify searches them all")
    ap.add_argument("--sealed-version", default=None, help="the sealed model to serve (PRIVFACE_SEALED_MODEL_VERSION; "
                                                            "default: the settings' default)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    lfw = lfw_dir()
    pairs = []
    for fold in (6, 7, 8, 9, 10):  # pairs.txt lists a fold's genuine pairs first: take both kinds, half each
        listed = fold_pairs(lfw, fold)
        genuine, impostor = [p for p in listed if p.same], [p for p in listed if not p.same]
        half = args.pairs_per_fold // 2
        pairs += genuine[:half] + impostor[: args.pairs_per_fold - half]
    stack = LocalStack(args.out / "stack", model_dir=args.out / "stack" / "models", party_timeout_s=120.0,
                       extra_env={**NO_ABUSE_LIMITS, "PRIVFACE_BUNDLED_MODEL_DIR": str(PROJECT_ROOT / "inference"
                                                                                        / "bundled"),
                                  **({"PRIVFACE_SEALED_MODEL_VERSION": args.sealed_version} if args.sealed_version
                                     else {})})
    load_before = os.getloadavg()
    fill_s: dict[str, float] = {}
    stack.start()
    try:
        key = stack.api_key("admin", "enroll", "verify")
        results: dict[str, list[dict[str, Any]]] = {"gateway": [], "sealed": []}
        if args.gallery:
            fillers = load_many(lfw, filler_photos(lfw, args.gallery))
            fill_s = {mode: enroll_fillers(stack, key, mode, fillers) for mode in ("gateway", "sealed")}
            print(f"gallery filled: {fill_s}", flush=True)
        for i, pair in enumerate(pairs):
            left, right = load_many(lfw, [pair.left, pair.right])
            for mode in (("gateway", "sealed") if i % 2 == 0 else ("sealed", "gateway")):
                results[mode].append(run_mode(stack, key, mode, left, right))
    finally:
        stack.stop()
    same = [p.same for p in pairs]
    report = {"pairs": len(pairs), "folds": "6-10 (the first genuine and impostor pairs of each fold, half each)", "load_average_before": load_before,
              "load_average_after": os.getloadavg(), "gallery_fillers_per_mode": args.gallery,
              "sealed_version": args.sealed_version or "default",
              "filler_enroll_seconds": fill_s, "gateway": summary(results["gateway"], same),
              "sealed": summary(results["sealed"], same), "rows": results}
    (args.out / "result.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
