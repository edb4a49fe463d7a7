"""Held-out evaluation of the global model before and after federated rounds: LFW folds 6-10, never a client.

Same pairs and the same noise draws for every evaluation: the evaluation's generator is re-created from
the same seed each time and the images are embedded in the same order, so before/after differ only by
the model (protocol of training_jobs.evaluate: leave-one-fold-out accuracy, TAR at FAR, rank-1).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inference.frequency_model import FrequencyFaceModel
from inference.transform import TransformSpec
from training_jobs.evaluate import DEFAULT_FOLDS, HeldoutSet, frequency_embedder, torch_features_fn


class Heldout:
    """A fixed subset of folds 6-10 pairs (balanced genuine/impostor per fold) and a fixed noise seed."""

    def __init__(self, lfw: Path, spec: TransformSpec, pairs_per_fold: int | None = 60, seed: int = 0,
                 folds: tuple[int, ...] = DEFAULT_FOLDS) -> None:
        self.spec = spec
        self.seed = seed
        self.pairs = HeldoutSet(lfw, folds, pairs_per_fold)

    @property
    def identities(self) -> frozenset[str]:
        return frozenset(path.split("/")[0] for path in self.pairs.images)

    def fingerprint(self) -> str:
        """What the metrics depend on besides the model: the pairs, the noise seed and the transform (a cached
        measurement is reused only for the same fingerprint)."""
        pairs = [[p.left, p.right, bool(p.same)] for p in self.pairs.pairs]
        text = json.dumps({"pairs": pairs, "seed": self.seed, "transform": self.spec.to_dict()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def evaluate(self, model: FrequencyFaceModel, name: str) -> dict[str, Any]:
        """Accuracy (leave-one-fold-out), TAR@FAR 1e-3/1e-4 and rank-1 of `model`, as a JSON-able dict."""
        model.eval()
        with torch.inference_mode():
            return self.evaluate_features_fn(torch_features_fn(model), name)

    def evaluate_features_fn(self, features_fn: Callable[[np.ndarray], np.ndarray], name: str) -> dict[str, Any]:
        """The same measurement for any embedder of features (e.g. a served ONNX version: the guardrail's
        baseline), so candidate and baseline are compared on the same pairs and noise draws."""
        embed = frequency_embedder(features_fn, self.spec, np.random.default_rng(self.seed))
        return summary(self.pairs.evaluate(name, self.spec.transform_id, embed).to_dict())


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of a training_jobs.evaluate result."""
    verification = result["verification"]
    return {"accuracy": verification.get("accuracy"), "accuracy_std": verification.get("accuracy_std"),
            "tar_at_far_1e-3": result["tar_at_far"]["0.001"]["tar"], "rank1": result["rank1"],
            "num_pairs": result["num_pairs"], "seconds": result["seconds"]}
