"""Metrics on a set of verification scores or embeddings (pure numpy; tested on synthetic scores): ROC points,
TAR at a FAR, accuracy with the threshold chosen on the other folds, rank-1 identification.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from inference.evaluation import best_threshold


def roc_points(scores: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(far, tar, threshold) for every distinct threshold, accept = score >= threshold, far ascending."""
    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    thresholds = np.concatenate([[np.inf], np.unique(scores)[::-1]])
    genuine = np.sort(scores[same])
    impostor = np.sort(scores[~same])
    tar = 1.0 - np.searchsorted(genuine, thresholds, side="left") / max(len(genuine), 1)
    far = 1.0 - np.searchsorted(impostor, thresholds, side="left") / max(len(impostor), 1)
    return far, tar, thresholds


def tar_at_far(scores: np.ndarray, same: np.ndarray, target_far: float) -> tuple[float, float]:
    """(TAR, threshold) at the lowest threshold whose FAR is <= target_far."""
    far, tar, thresholds = roc_points(scores, same)
    ok = np.flatnonzero(far <= target_far + 1e-12)
    best = ok[-1]  # far is non-decreasing as the threshold falls
    return float(tar[best]), float(thresholds[best])


def leave_one_fold_out_accuracy(scores: np.ndarray, same: np.ndarray, folds: np.ndarray) -> dict[str, Any]:
    """Accuracy per fold with the threshold chosen on the other folds; mean, std and per-fold values."""
    per_fold = {}
    for fold in np.unique(folds):
        test = folds == fold
        threshold = best_threshold(scores[~test], same[~test])
        per_fold[int(fold)] = {"accuracy": float(np.mean((scores[test] >= threshold) == same[test])),
                               "threshold": threshold}
    values = [v["accuracy"] for v in per_fold.values()]
    return {"accuracy": float(np.mean(values)), "accuracy_std": float(np.std(values)), "per_fold": per_fold}


def rank1(gallery: np.ndarray, gallery_labels: list[str], probes: np.ndarray, probe_labels: list[str]) -> float:
    """Fraction of probes whose most similar gallery embedding (cosine) has the probe's identity."""
    if len(probes) == 0:
        return float("nan")
    best = np.argmax(probes @ gallery.T, axis=1)
    return float(np.mean([gallery_labels[b] == label for b, label in zip(best, probe_labels)]))
