"""Embeddings per wall second of P gateway workers at once, each with its own one-thread ONNX Runtime session.

    python -m bench.ort_parallel [--model inference/bundled/v1-accurate] [--int8 var/int8/v1-accurate-int8/model.onnx]
        [--processes 1,2] [--batches 1,16] [--seconds 5] [--rounds 3] [--out docs/results/ort_parallel.json]

Why: issue 13 asks for 300 embeddings/s on this 2-core machine. `bench.ort_throughput` measures one session per
CPU-second; what a deployment gets is the wall-clock rate of ``privface gateway --workers P``, P processes that
each own a session (``PRIVFACE_ORT_THREADS`` = 1, no spinning), competing for the same cores. Here P spawned
processes load their session, meet at a barrier, embed real noisy features for the same ``--seconds``, and
the rate is the sum of their embeddings over the window. Every (model, P, batch) setting is measured in each
round, the order reversed every other round; the report gives each setting's median and the load average at
the start and the end (the machine is shared: an idle one is the precondition for a ceiling figure).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.ort_throughput import BUNDLED, real_features
from inference.metadata import ModelMetadata


def worker(model: str, features: np.ndarray, seconds: float, barrier: Any, counts: Any, index: int) -> None:
    """One gateway worker's embedder: load, warm, wait for the others, embed until the window closes."""
    from inference.runtime import OrtEmbedder

    embedder = OrtEmbedder(model, prefer_gpu=False, intra_op_threads=1, spin=False)
    embedder.embed(features)  # the first run of a shape allocates
    barrier.wait()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        embedder.embed(features)
        done += len(features)
    counts[index] = done / (time.perf_counter() - start)


def parallel_rate(model: Path, processes: int, features: np.ndarray, seconds: float) -> float:
    """Summed embeddings per second of ``processes`` workers embedding ``features`` batches at the same time."""
    context = mp.get_context("spawn")  # no inherited OpenMP/ORT thread state
    barrier = context.Barrier(processes)
    counts = context.Array("d", processes)
    workers = [context.Process(target=worker, args=(str(model), features, seconds, barrier, counts, i))
               for i in range(processes)]
    for process in workers:
        process.start()
    for process in workers:
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(f"a worker failed (exit code {process.exitcode})")
    return float(np.sum(counts[:]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=BUNDLED / "v1-accurate")
    parser.add_argument("--int8", type=Path, default=None, help="an int8 model file (inference.quantize) as well")
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    models = {"fp32": args.model / ModelMetadata.load(args.model).onnx_file}
    if args.int8 is not None:
        if not args.int8.is_file():
            parser.error(f"--int8 {args.int8}: no such file")
        models["int8"] = args.int8
    settings = [(name, p, b) for name in models for p in map(int, args.processes.split(","))
                for b in map(int, args.batches.split(","))]
    features = real_features(args.model, max(b for _, _, b in settings))
    load_start = os.getloadavg()
    samples: dict[tuple[str, int, int], list[float]] = {s: [] for s in settings}
    for round_no in range(args.rounds):
        for name, p, b in settings if round_no % 2 == 0 else settings[::-1]:
            samples[(name, p, b)].append(parallel_rate(models[name], p, features[:b], args.seconds))
        print(f"round {round_no + 1}/{args.rounds} done, load {os.getloadavg()[0]:.1f}", flush=True)
    report = {"model": args.model.name, "int8_model": str(args.int8) if args.int8 else None,
              "cpu_count": os.cpu_count(), "load_average_start": [round(x, 2) for x in load_start],
              "load_average_end": [round(x, 2) for x in os.getloadavg()], "seconds_per_sample": args.seconds,
              "rounds": args.rounds, "command": "python -m bench.ort_parallel " + " ".join(argv or sys.argv[1:]),
              "per_s": {f"{name}, {p} process{'es' if p > 1 else ''}, batch {b}":
                        {"median": round(float(np.median(v)), 1), "samples": [round(x, 1) for x in v]}
                        for (name, p, b), v in samples.items()}}
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
