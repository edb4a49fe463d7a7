"""LFW verification accuracy of a features -> embedding function, the way model metrics are reported.

Protocol (documented in docs/models/v0.md): the pairs of one pairs.txt fold (600 for fold 1), each image
transformed once by the client transform (its own noise draw), cosine of the L2-normalised embeddings.
Accuracy is 10-fold cross-validated INSIDE the evaluated pairs: split them into 10 interleaved parts,
pick the accuracy-maximising threshold on 9, score the 10th, average. The served threshold is the
accuracy-maximising threshold over all evaluated pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from inference.lfw import Pair, fold_pairs, load_many
from inference.transform import TransformSpec, apply

EmbedFn = Callable[[np.ndarray], np.ndarray]  # float32 [B, K, 14, 14] -> [B, d]


@dataclass(frozen=True)
class VerificationResult:
    accuracy: float  # mean of the 10 CV parts
    accuracy_std: float
    threshold: float  # best over all evaluated pairs
    num_pairs: int

    def to_dict(self) -> dict[str, float | int]:
        return {"accuracy": round(self.accuracy, 5), "accuracy_std": round(self.accuracy_std, 5),
                "threshold": round(self.threshold, 5), "num_pairs": self.num_pairs}


def best_threshold(scores: np.ndarray, same: np.ndarray) -> float:
    """Threshold (midpoint between sorted scores) maximising accuracy of `score >= threshold`."""
    candidates = np.sort(scores)
    mids = np.concatenate([[candidates[0] - 1e-6], (candidates[1:] + candidates[:-1]) / 2, [candidates[-1] + 1e-6]])
    accuracy = [np.mean((scores >= t) == same) for t in mids]
    return float(mids[int(np.argmax(accuracy))])


def cross_validated_accuracy(scores: np.ndarray, same: np.ndarray, parts: int = 10) -> tuple[float, float]:
    """Mean and std of accuracy over `parts` interleaved splits, threshold picked on the others."""
    part_of = np.arange(len(scores)) % parts
    accuracies = []
    for part in range(parts):
        test = part_of == part
        threshold = best_threshold(scores[~test], same[~test])
        accuracies.append(np.mean((scores[test] >= threshold) == same[test]))
    return float(np.mean(accuracies)), float(np.std(accuracies))


def embed_images(lfw: Path, images: list[str], spec: TransformSpec, embed: EmbedFn,
                 rng: np.random.Generator, batch: int = 64) -> dict[str, np.ndarray]:
    """Embedding per image path, each image transformed once (one noise draw) as a client would."""
    out: dict[str, np.ndarray] = {}
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        features = apply(load_many(lfw, chunk), spec, rng).astype(np.float32)
        vectors = embed(features)
        vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        out.update(zip(chunk, vectors))
    return out


def verify_pairs(lfw: Path, pairs: list[Pair], spec: TransformSpec, embed: EmbedFn,
                 seed: int = 0) -> VerificationResult:
    images = sorted({path for pair in pairs for path in (pair.left, pair.right)})
    vectors = embed_images(lfw, images, spec, embed, np.random.default_rng(seed))
    scores = np.array([float(vectors[p.left] @ vectors[p.right]) for p in pairs])
    same = np.array([p.same for p in pairs])
    accuracy, spread = cross_validated_accuracy(scores, same)
    return VerificationResult(accuracy, spread, best_threshold(scores, same), len(pairs))


def verify_fold(lfw: Path, fold: int, spec: TransformSpec, embed: EmbedFn, max_pairs: int | None = None,
                seed: int = 0) -> VerificationResult:
    """Accuracy on one fold; max_pairs keeps the first pairs, balanced (same and different halves)."""
    pairs = fold_pairs(lfw, fold)
    if max_pairs is not None and max_pairs < len(pairs):
        same = [p for p in pairs if p.same][: max_pairs // 2]
        different = [p for p in pairs if not p.same][: max_pairs - max_pairs // 2]
        pairs = same + different
    return verify_pairs(lfw, pairs, spec, embed, seed)
