"""A random-subset model on held-out pairs whose two photos come from ONE device (the same channels) or from two.

    python -m training_jobs.device_pairs --model var/models-trained/v6-balanced --folds 6-10 \
        [--out docs/results/rand33_device_pairs.json]

Why: the SDK pins a random-subset transform's channels per device (`client/subset_key.py`), so a user who enrolls
and verifies on one phone sends both photos with the same channels, while `training_jobs.evaluate` gives every
image its own subset (two devices). This scores every pair both ways, on the same photos and the same noise seed:
per pair one seeded subset for both photos (one device), or a subset each (two devices); accuracy with the
leave-one-fold-out threshold and TAR at FAR 1e-3. A model of a transform without subsets is refused.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from inference.lfw import lfw_dir, shared_dir
from inference.metadata import ModelMetadata
from inference.transform import TransformSpec, apply
from training_jobs.attacks.data import FixedSubsets
from training_jobs.eval_metrics import leave_one_fold_out_accuracy, tar_at_far
from training_jobs.evaluate import HeldoutSet, onnx_features_fn, parse_folds

BATCH = 64


def embed_with_subsets(faces: np.ndarray, spec: TransformSpec, rankings: np.ndarray, rng: np.random.Generator,
                       features_fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Embeddings of `faces` [n, 112, 112, 3], face i releasing the channels that `rankings[i]` ranks first."""
    out = []
    for start in range(0, len(faces), BATCH):
        chunk = slice(start, start + BATCH)
        source = FixedSubsets(rng, rankings[chunk])
        out.append(features_fn(apply(faces[chunk], spec, source).astype(np.float32)))
    return np.concatenate(out)


def pair_scores(heldout: HeldoutSet, spec: TransformSpec, features_fn: Callable[[np.ndarray], np.ndarray],
                seed: int, one_device: bool) -> np.ndarray:
    """Cosine score of every pair; both photos with the same subset when `one_device`."""
    rng = np.random.default_rng(seed)
    n = len(heldout.pairs)
    left_rankings = rng.random((n, spec.num_channels))
    right_rankings = left_rankings if one_device else rng.random((n, spec.num_channels))
    left = heldout.faces[[heldout.index[p.left] for p in heldout.pairs]]
    right = heldout.faces[[heldout.index[p.right] for p in heldout.pairs]]
    a = embed_with_subsets(left, spec, left_rankings, rng, features_fn)
    b = embed_with_subsets(right, spec, right_rankings, rng, features_fn)
    scores: np.ndarray = np.sum(a * b, axis=1)
    return scores


def summary(scores: np.ndarray, heldout: HeldoutSet) -> dict[str, Any]:
    same = np.array([p.same for p in heldout.pairs])
    folds = np.array([p.fold for p in heldout.pairs])
    accuracy = leave_one_fold_out_accuracy(scores, same, folds)
    tar, threshold = tar_at_far(scores, same, 1e-3)
    return {"accuracy": accuracy["accuracy"], "accuracy_std": accuracy["accuracy_std"],
            "tar_at_far_1e-3": tar, "threshold_at_far_1e-3": threshold}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a model version folder (model.json + ONNX)")
    parser.add_argument("--folds", default="6-10")
    parser.add_argument("--pairs-per-fold", type=int, default=None, help="default: every pair")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        meta = ModelMetadata.load(args.model)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        parser.error(f"--model {args.model}: not a model version folder ({exc})")
    if meta.spec.random_channels is None:
        parser.error(f"--model {args.model}: its transform {meta.spec.transform_id} releases every channel")
    heldout = HeldoutSet(lfw_dir(shared_dir()), parse_folds(args.folds), args.pairs_per_fold)
    features_fn = onnx_features_fn(args.model / meta.onnx_file)
    report = {"model": str(args.model), "transform": meta.spec.transform_id, "folds": list(heldout.folds),
              "pairs": len(heldout.pairs), "seed": args.seed}
    for name, one_device in (("two_devices", False), ("one_device", True)):
        report[name] = summary(pair_scores(heldout, meta.spec, features_fn, args.seed, one_device), heldout)
        print(f"{name}: accuracy {100 * report[name]['accuracy']:.2f}%, TAR@1e-3 "
              f"{100 * report[name]['tar_at_far_1e-3']:.1f}%", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
