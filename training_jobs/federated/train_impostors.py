"""Train the impostor-feature generator centrally, save its checkpoint, and measure it.

    PYTHONPATH=$PWD .venv-federated/bin/python -m training_jobs.federated.train_impostors \
        --images 1500 --steps 1500 --out training_jobs/federated/impostor_gan_dct8-v0.pt \
        --report docs/results/federated_impostor_gan.json

Data: LFW training identities only (make_split: nobody in View-2 folds 6-10), sorted by name, minus the first
`--skip-clients` names (the simulated devices of the benchmarks are the first names: the server must not have
trained on their photos), one photo per identity. Features: the transform's clipped DCT planes, without noise
(devices add the served noise to what the generator makes, as they do to their own features).

Measurement (does the served model see faces?): the served v0 model embeds, with the served noise,
(a) generated features, (b) a noise baseline (Gaussian features with the real per-channel mean and std, clipped),
(c) real features of other training identities; for each, the mean over samples of the maximum cosine to a
reference set of real embeddings (yet other identities). Faces of strangers sit near other faces; noise does not.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inference.frequency_model import build_model_v0
from inference.lfw import load_many
from inference.transform import PRESETS, TransformSpec, add_noise, clipped
from training_jobs.datasets import identity_of, make_split
from training_jobs.federated.impostors import (DEFAULT_CHECKPOINT, FeatureGenerator, ImpostorSource, save_generator,
                                               to_units, train_gan)
from training_jobs.federated.script import setup, write_report


def gan_identities(lfw: Path, skip_clients: int) -> list[tuple[str, str]]:
    """(identity, first photo) of every training identity after the first `skip_clients` names."""
    split = make_split(lfw, min_images=1)
    first: dict[str, str] = {}
    for path in split.train_images:
        first.setdefault(identity_of(path), path)
    names = sorted(first)[skip_clients:]
    return [(name, first[name]) for name in names]


@torch.no_grad()
def embed(model: torch.nn.Module, features: np.ndarray, batch: int = 64) -> np.ndarray:
    """Served (normalised, flip-averaged) embeddings of feature maps."""
    out = [model(torch.from_numpy(features[i:i + batch].astype(np.float32))) for i in range(0, len(features), batch)]
    return torch.cat(out).numpy()


def mean_max_cosine(queries: np.ndarray, reference: np.ndarray) -> float:
    return float((queries @ reference.T).max(axis=1).mean())


def measure(generator: FeatureGenerator, spec: TransformSpec, shared: Path, real_units: np.ndarray,
            reference_clean: np.ndarray, probe_clean: np.ndarray, seed: int = 1) -> dict[str, Any]:
    """Mean max-cosine to real reference embeddings: generated vs noise baseline vs real strangers."""
    model = build_model_v0(spec, shared)
    rng = np.random.default_rng(seed)
    n = len(probe_clean)
    bounds = spec.clip_bounds()[:, None, None]
    reference = embed(model, add_noise(reference_clean, spec, rng))
    generated = embed(model, ImpostorSource(generator, spec).sample(n, rng).numpy())
    mean, std = real_units.mean(axis=0), real_units.std(axis=0)  # per channel AND position
    noise_units = np.clip(rng.normal(mean, std, size=(n, *mean.shape)), -1, 1)
    noise = embed(model, add_noise(noise_units * bounds, spec, rng))
    real = embed(model, add_noise(probe_clean, spec, rng))
    gen_units = to_units(ImpostorSource(generator, spec).clean(n, rng), spec)
    pairwise = generated @ generated.T
    return {
        "mean_max_cosine_to_real": {"generated": mean_max_cosine(generated, reference),
                                    "noise_baseline": mean_max_cosine(noise, reference),
                                    "real_strangers": mean_max_cosine(real, reference)},
        "mean_pairwise_cosine": {"generated": float(pairwise[~np.eye(n, dtype=bool)].mean()),
                                 "real_strangers": float((real @ real.T)[~np.eye(n, dtype=bool)].mean())},
        "units_std_real_vs_generated": [float(real_units.std()), float(gen_units.std())],
        "max_abs_units_generated": float(np.abs(gen_units).max()),
        "reference_images": len(reference_clean), "probe_images": n, "seed": seed}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transform", default="dct8-v0", choices=sorted(PRESETS))
    parser.add_argument("--epsilon", type=float, default=64.0, help="served noise per coefficient (measurement)")
    parser.add_argument("--images", type=int, default=1500, help="training photos (one per identity)")
    parser.add_argument("--probe", type=int, default=200, help="photos in each of the measurement's real sets")
    parser.add_argument("--skip-clients", type=int, default=200,
                        help="leave out the first N training identities by name (the benchmarks' devices)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--minutes", type=float, default=5.0, help="stop training after this long (CPU bound)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--report", type=Path, default=None)
    args = parser.parse_args(argv)
    shared, lfw, spec = setup(args.transform, args.epsilon)
    identities = gan_identities(lfw, args.skip_clients)
    needed = args.images + 2 * args.probe
    if len(identities) < needed:
        parser.error(f"only {len(identities)} identities available, need {needed}")
    order = np.random.default_rng(args.seed).permutation(len(identities))[:needed]
    paths = [identities[i][1] for i in order]
    start = time.perf_counter()
    clean = clipped(load_many(lfw, paths), spec)
    train_clean, reference, probe = np.split(clean, [args.images, args.images + args.probe])
    real_units = to_units(train_clean, spec)
    generator, history = train_gan(real_units, args.steps, batch_size=args.batch_size, seed=args.seed,
                                   max_seconds=60 * args.minutes)
    steps = history[-1]["step"]
    train_seconds = time.perf_counter() - start
    trained_on = {"identities": args.images, "photos_per_identity": 1, "skip_first_names": args.skip_clients,
                  "eval_folds_excluded": [6, 7, 8, 9, 10], "steps": steps, "batch_size": args.batch_size, "seed": args.seed}
    sha = save_generator(generator, spec, args.out, trained_on)
    report = {"checkpoint": str(args.out), "sha256": sha, "bytes": args.out.stat().st_size,
              "parameters": sum(p.numel() for p in generator.parameters()), "transform": spec.transform_id,
              "trained_on": trained_on, "train_seconds": round(train_seconds, 1), "history": history,
              "measure": measure(generator, spec, shared, real_units, reference, probe)}
    print(write_report(report, args.report))


if __name__ == "__main__":
    main()
