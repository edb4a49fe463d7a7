"""Latency (p50/p95) of enroll, verify and identify through REST + MPC at gallery sizes 100 and 1,000.

Starts the real local stack, enrolls aligned LFW faces (one per identity) through the SDK's payload code,
and times sequential requests from one client. The plaintext cost of the same 1:N search (numpy dot
products + argmax over the same gallery size) is measured in the same run as the baseline ratio.

    python -m bench.latency [--sizes 100 1000] [--queries 30] [--out docs/results/latency.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.paths import shared_dir
from inference.lfw import load_rgb
from devtools.localstack import LocalStack, NO_ABUSE_LIMITS
from client.features import encode_features, fresh_rng
from client.sdk import PrivfaceClient


def faces(count: int) -> list[np.ndarray]:
    root = shared_dir() / "datasets" / "lfw-aligned-112"
    out = []
    for person in sorted(p for p in root.iterdir() if p.is_dir()):
        image = next(iter(sorted(person.glob("*.jpg"))), None)
        if image is not None:
            out.append(load_rgb(root, image.relative_to(root).as_posix()))
        if len(out) == count:
            return out
    raise SystemExit(f"only {len(out)} identities available")


def percentiles(samples: list[float]) -> dict[str, float]:
    ms = np.asarray(samples) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 1), "p95_ms": round(float(np.percentile(ms, 95)), 1),
            "n": len(samples)}


def timed(call, *args) -> float:
    started = time.perf_counter()
    call(*args)
    return time.perf_counter() - started


def plaintext_search_s(n: int, d: int, repeats: int = 50) -> float:
    gallery = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    query = gallery[0]
    started = time.perf_counter()
    for _ in range(repeats):
        scores = gallery @ query
        int(np.argmax(scores)), float(scores.max())
    return (time.perf_counter() - started) / repeats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--queries", type=int, default=30)
    parser.add_argument("--workdir", type=Path, default=Path("var/bench-latency"))
    parser.add_argument("--out", type=Path, default=Path("docs/results/latency.json"))
    args = parser.parse_args(argv)
    pool = faces(max(args.sizes))
    stack = LocalStack(args.workdir / time.strftime("%Y%m%d-%H%M%S"), extra_env=NO_ABUSE_LIMITS).start()
    results = {}
    try:
        client = PrivfaceClient(stack.url, stack.api_key("enroll", "verify"), timeout=120)
        spec = client.transform
        subjects: list[str] = []
        for size in sorted(args.sizes):
            enroll_times = []
            for face in tqdm(pool[len(subjects):size], desc=f"enroll to {size}"):
                subject = client.create_subject()["id"]
                payload = encode_features(spec.apply(face, fresh_rng()), spec)
                enroll_times.append(timed(client.enroll_features, subject, payload))
                subjects.append(subject)
            verify_times, identify_times = [], []
            for i in tqdm(range(args.queries), desc=f"verify+identify at {size}"):
                index = (i * 7919) % size
                probe = encode_features(spec.apply(pool[index], fresh_rng()), spec)
                verify_times.append(timed(client.verify_features, subjects[index], probe))
                probe = encode_features(spec.apply(pool[index], fresh_rng()), spec)
                identify_times.append(timed(client.identify_features, probe))
            plain = plaintext_search_s(size, spec_dim(stack))
            identify = percentiles(identify_times)
            results[str(size)] = {"enroll": percentiles(enroll_times), "verify": percentiles(verify_times),
                                  "identify": identify, "plaintext_identify_ms": round(plain * 1000, 3),
                                  "identify_p50_over_plaintext": round(identify["p50_ms"] / (plain * 1000), 1)}
            print(size, json.dumps(results[str(size)]))
    finally:
        stack.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"gallery_sizes": results, "machine": machine()}, indent=1) + "\n")


def spec_dim(stack: LocalStack) -> int:
    return json.loads((stack.model_dir / "v0" / "model.json").read_text())["embedding_dim"]


def machine() -> str:
    import os
    import platform

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


if __name__ == "__main__":
    main()
