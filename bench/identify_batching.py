"""Identify throughput with concurrent clients: batching of concurrent queries into one MPC job, on vs off.

Starts the real local stack, enrolls aligned LFW faces (one per identity) up to the gallery size, then runs
``--clients`` threads that each send identify requests back to back, first with the gateway's default
batching window (PRIVFACE_IDENTIFY_BATCH_WAIT_MS=5) and then with batching off (=0) — the gateway is
restarted in between; parties, dealer and gallery stay. Prints requests/s of each and the ratio.

    python -m bench.identify_batching [--gallery 1000] [--clients 16] [--requests 64]
"""
from __future__ import annotations

import argparse
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from devtools.localstack import LocalStack, NO_ABUSE_LIMITS
from bench.latency import faces
from client.features import encode_features, fresh_rng
from client.sdk import PrivfaceClient


def jobs_run(stack: LocalStack) -> int:
    """MPC jobs party 0 has run so far (a batch counts once)."""
    port = stack.party_ports[0]
    state = httpx.get(f"http://127.0.0.1:{port}/internal/state", headers={"Authorization": f"Bearer {stack.tokens[0]}"})
    return int(state.json()["jobs_run"])


def throughput(stack: LocalStack, key: str, spec, probes: list[tuple[np.ndarray, str]], clients: int,
               requests: int) -> dict:
    """``requests`` identify calls from ``clients`` threads (payloads made beforehand): requests/s, MPC jobs
    run, and how many answered the enrolled subject of the probe (batching must not change answers)."""
    work = [(encode_features(spec.apply(face, fresh_rng()), spec), subject)
            for face, subject in (probes[i % len(probes)] for i in range(requests))]
    errors: list[str] = []
    correct: list[bool] = []
    lock = threading.Lock()
    jobs_before = jobs_run(stack)

    def worker(mine: list) -> None:
        client = PrivfaceClient(stack.url, key, timeout=300)
        for payload, subject in mine:
            try:
                found = client.identify_features(payload)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(type(exc).__name__)
            else:
                with lock:
                    correct.append(found == subject)

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, [work[c::clients] for c in range(clients)]))
    elapsed = time.perf_counter() - started
    return {"requests": requests, "seconds": round(elapsed, 2), "rps": round(requests / elapsed, 2),
            "mpc_jobs": jobs_run(stack) - jobs_before, "errors": len(errors), "correct": sum(correct)}


def restart_gateway(stack: LocalStack, wait_ms: float) -> None:
    if "gateway" in stack.processes:
        stack.kill("gateway", 15)
    stack.start_process("gateway", {"PRIVFACE_IDENTIFY_BATCH_WAIT_MS": str(wait_ms)})
    stack.wait_ready()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gallery", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64, help="identify requests per setting")
    parser.add_argument("--wait-ms", type=float, default=5.0, help="the batching window when on")
    parser.add_argument("--workdir", type=Path, default=Path("var/bench-identify-batching"))
    args = parser.parse_args(argv)
    pool = faces(args.gallery)
    stack = LocalStack(args.workdir / time.strftime("%Y%m%d-%H%M%S"), extra_env=NO_ABUSE_LIMITS)
    stack.cli("models", "ensure")
    for name in ("dealer", "party0", "party1"):
        stack.start_process(name)
    results: dict[str, dict] = {}
    try:
        restart_gateway(stack, args.wait_ms)
        key = stack.api_key("enroll", "verify")
        spec = PrivfaceClient(stack.url, key).transform

        def enroll(face: np.ndarray) -> str:
            client = PrivfaceClient(stack.url, key, timeout=120)
            subject = client.create_subject()["id"]
            client.enroll_features(subject, encode_features(spec.apply(face, fresh_rng()), spec))
            return subject

        started = time.perf_counter()
        with ThreadPoolExecutor(4) as executor:
            subjects = list(executor.map(enroll, pool))
        print(f"enrolled {len(pool)} in {time.perf_counter() - started:.0f}s", flush=True)
        step = max(1, len(pool) // 97)  # enrolled faces spread over the gallery, with their subjects
        probes = list(zip(pool[::step], subjects[::step]))
        throughput(stack, key, spec, probes, args.clients, args.clients)  # warm-up (models, MPC gallery)
        for label, wait_ms in (("batching_on", args.wait_ms), ("batching_off", 0.0)):
            restart_gateway(stack, wait_ms)
            throughput(stack, key, spec, probes, args.clients, args.clients)  # warm the fresh gateway
            results[label] = {"wait_ms": wait_ms, **throughput(stack, key, spec, probes, args.clients, args.requests)}
            print(label, json.dumps(results[label]), flush=True)
    finally:
        stack.stop()
    ratio = results["batching_on"]["rps"] / results["batching_off"]["rps"]
    print(json.dumps({"gallery": args.gallery, "clients": args.clients, **results,
                      "rps_ratio_on_over_off": round(ratio, 2)}, indent=1))


if __name__ == "__main__":
    main()
