"""Embeddings per second of a served model through `inference.runtime.OrtEmbedder`, several session settings.

The development machine is shared (2 cores, many busy processes), so absolute rates move with the load. Every
setting is therefore measured in the same run, in alternating order, round after round; the report gives
each setting's median rate, its ratio to main's setting, embeddings per CPU-second of this process (less
sensitive to the load than wall time) and the load average at the start and the end.

    python -m bench.ort_throughput [--model inference/bundled/v1-accurate] [--int8 var/int8/v1-accurate/model.onnx]
        [--batches 1,4,16,32] [--seconds 2] [--rounds 5] [--out docs/results/ort_throughput.json]

Features are real: noisy transforms (the model's served transform, one noise draw each) of LFW photos of
identities in no View-2 fold.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from inference.lfw import images_outside_pairs, lfw_dir, load_many
from inference.metadata import ModelMetadata
from inference.runtime import OrtEmbedder
from inference.transform import TransformSpec, apply

BUNDLED = Path(__file__).resolve().parent.parent / "inference" / "bundled"


@dataclass(frozen=True)
class Setting:
    name: str
    threads: int | None  # None: ORT's default (one per core)
    spin: bool | None  # None: ORT's default (spinning workers)
    int8: bool = False
    io_binding: bool = False
    level: ort.GraphOptimizationLevel | None = None  # None: ORT's default (ORT_ENABLE_ALL)


SETTINGS = (
    Setting("main", None, None),  # what main's gateway builds: OrtEmbedder(path)
    Setting("basic-opt", None, None, level=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC),
    Setting("2 threads, no spin", 2, False),
    Setting("1 thread", 1, False),
    Setting("1 thread, io binding", 1, False, io_binding=True),
    Setting("int8, 1 thread", 1, False, int8=True),
)


def real_features(model_dir: Path, count: int, seed: int = 0) -> np.ndarray:
    """`count` noisy features of the model's transform, from photos of identities in no View-2 fold."""
    meta = ModelMetadata.load(model_dir)
    spec = TransformSpec.from_dict(meta.transform)
    lfw = lfw_dir()
    images = images_outside_pairs(lfw)
    rng = np.random.default_rng(seed)
    chosen = [images[i] for i in rng.choice(len(images), count, replace=False)]
    return apply(load_many(lfw, chosen), spec, rng).astype(np.float32)


def make_runner(setting: Setting, fp32: Path, int8: Path | None):
    """A callable batch -> embeddings for `setting` (None when the setting needs a missing int8 model)."""
    model = int8 if setting.int8 else fp32
    if model is None:
        return None
    embedder = OrtEmbedder(model, prefer_gpu=False, intra_op_threads=setting.threads,
                           spin=setting.spin)
    if setting.level is not None:  # a second session with the same settings but another optimisation level
        options = ort.SessionOptions()
        options.graph_optimization_level = setting.level
        embedder.session = ort.InferenceSession(str(fp32), options, providers=["CPUExecutionProvider"])
    if not setting.io_binding:
        return embedder.embed
    session = embedder.session
    output = session.get_outputs()[0].name

    def run_bound(batch: np.ndarray) -> np.ndarray:
        binding = session.io_binding()
        binding.bind_cpu_input(embedder.input_name, np.ascontiguousarray(batch, dtype=np.float32))
        binding.bind_output(output)
        session.run_with_iobinding(binding)
        result: np.ndarray = binding.copy_outputs_to_cpu()[0]
        return result
    return run_bound


def rate(run, batch: np.ndarray, seconds: float) -> tuple[float, float]:
    """(embeddings per wall second, embeddings per CPU-second of this process) over about `seconds`."""
    run(batch)  # warm: the first run of a shape allocates
    done, wall, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - wall < seconds:
        run(batch)
        done += len(batch)
    return done / (time.perf_counter() - wall), done / max(time.process_time() - cpu, 1e-9)


def measure(runners: dict, features: np.ndarray, batches: list[int], seconds: float, rounds: int,
            after_round=lambda results, done: None) -> dict:
    """Median rates per batch size and setting; `after_round(results so far, rounds done)` after each round."""
    names = list(runners)
    samples: dict = {b: {n: ([], []) for n in names} for b in batches}
    for round_no in range(rounds):
        order = names if round_no % 2 == 0 else names[::-1]  # alternate: no setting always runs first
        for b in batches:
            for name in order:
                wall, cpu = rate(runners[name], features[:b], seconds)
                samples[b][name][0].append(wall)
                samples[b][name][1].append(cpu)
        print(f"round {round_no + 1}/{rounds} done, load {os.getloadavg()[0]:.1f}", flush=True)
        after_round(summary(samples, batches), round_no + 1)
    return summary(samples, batches)


def summary(samples: dict, batches: list[int]) -> dict:
    out: dict = {}
    for b in batches:
        base = float(np.median(samples[b]["main"][0]))
        out[str(b)] = {name: {"per_s": round(float(np.median(w)), 1), "per_cpu_s": round(float(np.median(c)), 1),
                              "ratio_to_main": round(float(np.median(w)) / base, 2)}
                       for name, (w, c) in samples[b].items()}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=BUNDLED / "v1-accurate")
    parser.add_argument("--int8", type=Path, default=None, help="an int8 model (inference.quantize) to compare")
    parser.add_argument("--batches", default="1,4,16,32")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    features = real_features(args.model, max(batches))
    fp32 = args.model / ModelMetadata.load(args.model).onnx_file
    runners = {s.name: r for s in SETTINGS if (r := make_runner(s, fp32, args.int8)) is not None}
    load_start = os.getloadavg()

    def report(results: dict, rounds_done: int) -> dict:
        return {"model": args.model.name, "int8_model": str(args.int8) if args.int8 else None,
                "cpu_count": os.cpu_count(), "load_average_start": [round(x, 1) for x in load_start],
                "load_average_end": [round(x, 1) for x in os.getloadavg()], "seconds_per_sample": args.seconds,
                "rounds": rounds_done, "onnxruntime": ort.__version__, "batches": results,
                "command": "python -m bench.ort_throughput " + " ".join(argv or sys.argv[1:])}

    def save(results: dict, rounds_done: int) -> None:
        if args.out:
            args.out.write_text(json.dumps(report(results, rounds_done), indent=1) + "\n")

    results = measure(runners, features, batches, args.seconds, args.rounds, save)
    print(json.dumps(report(results, args.rounds), indent=1))


if __name__ == "__main__":
    main()
