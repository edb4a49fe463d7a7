"""Operating points of a model version: thresholds for target false-match rates, per comparison and per search.

Calibration data: LFW identities that appear in NO View-2 fold (``lfw.images_outside_pairs``), so no threshold is
ever tuned on the held-out folds 6-10 (nor on folds 1-5). Each image goes through the model's own input (the
SDK's transform with its noise, one draw per image, seeded) and impostor scores are the cosines of every pair of
images of different people.

* ``ImpostorCurve.threshold(fmr)``: the empirical quantile while the data resolve the rate (>= ``MIN_TAIL_COUNT``
  impostor pairs above it); below that an exponential tail fitted to the top ``MIN_TAIL_COUNT`` scores (mean
  excess), P(S > u + x) = p_u exp(-x / beta), extrapolates. Capped at 1 (cosine). model.json keeps the curve
  (``impostor_curve``), so a deployment's target (``PRIVFACE_IDENTIFY_FPIR``) turns into thresholds at load.
* Identify (1:N) reveals whether the best of N scores passes, so a per-search false-positive identification rate
  FPIR needs the per-comparison rate 1 - (1 - FPIR)^(1/N) (~ FPIR / N): ``identify_schedule`` lists, for gallery
  sizes up to each bound, the threshold that holds FPIR at that bound (``secure/thresholds.py`` applies it).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inference.transform import TransformSpec

MIN_TAIL_COUNT = 200
SCHEDULE_SIZES = tuple(m * 10**e for e in range(1, 7) for m in (1, 2, 5)) + (10_000_000,)  # 10 .. 10M, 1-2-5
DEFAULT_FPIR = 1e-2
CALIBRATION_IMAGES = 1200
MIN_CALIBRATION_IMAGES = 100  # ~4,900 impostor pairs: enough to place a threshold at false-match rate 1e-3


def impostor_scores(embeddings: np.ndarray, identities: list[str]) -> np.ndarray:
    """Cosine scores of every pair of rows with different identities (rows L2-normalised here)."""
    e = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    ids = np.asarray(identities)
    out = []
    for i in range(len(e) - 1):
        s = e[i + 1:] @ e[i]
        out.append(s[ids[i + 1:] != ids[i]])
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


def per_comparison_fmr(fpir: float, n: int) -> float:
    """The per-comparison false-match rate whose best-of-n false-positive rate is ``fpir``."""
    return -math.expm1(math.log1p(-fpir) / max(int(n), 1))


def threshold_at_fmr(impostors: np.ndarray, fmr: float) -> float:
    """The lowest threshold t with P(impostor score >= t) <= fmr (see the module docstring)."""
    return ImpostorCurve.from_scores(impostors).threshold(fmr)


@dataclass(frozen=True)
class ImpostorCurve:
    """A model's impostor score tail, compact enough for model.json: thresholds at log-spaced false-match rates
    (8 per decade, down to where ``MIN_TAIL_COUNT`` pairs remain) and the exponential tail beyond."""

    fmr: tuple[float, ...]          # decreasing
    thresholds: tuple[float, ...]   # increasing
    tail_u: float
    tail_beta: float
    tail_p: float
    pairs: int
    source: str = ""

    @classmethod
    def from_scores(cls, impostors: np.ndarray, source: str = "") -> ImpostorCurve:
        scores = np.sort(np.asarray(impostors, dtype=np.float64))[::-1]
        if scores.size < 2 * MIN_TAIL_COUNT:
            raise ValueError(f"calibration needs at least {2 * MIN_TAIL_COUNT} impostor scores")
        p_u = MIN_TAIL_COUNT / scores.size
        grid = [10 ** (-k / 8) for k in range(1, 200) if 10 ** (-k / 8) >= p_u]
        ts = [float(min(1.0, np.nextafter(scores[int(math.floor(f * scores.size))], np.inf))) for f in grid]
        u = float(scores[MIN_TAIL_COUNT - 1])
        beta = max(float(np.mean(scores[:MIN_TAIL_COUNT] - u)), 1e-6)
        return cls(tuple(grid), tuple(ts), u, beta, p_u, int(scores.size), source)

    def threshold(self, fmr: float) -> float:
        """Empirical (log-interpolated) where the data resolve ``fmr``; the fitted tail below; capped at 1."""
        if not 0 < fmr < 1:
            raise ValueError("fmr must lie in (0, 1)")
        if fmr >= self.fmr[0]:
            return self.thresholds[0]
        if fmr >= self.fmr[-1]:
            logs = np.log(np.asarray(self.fmr)[::-1])
            return float(np.interp(math.log(fmr), logs, np.asarray(self.thresholds)[::-1]))
        return float(min(1.0, self.tail_u + self.tail_beta * math.log(self.tail_p / fmr)))

    def identify_schedule(self, fpir: float, sizes: tuple[int, ...] = SCHEDULE_SIZES,
                          floor: float = -1.0) -> list[list[float]]:
        """[[max_n, threshold], ...] holding ``fpir`` per search; never below ``floor`` (the verify threshold)."""
        return [[int(n), max(floor, self.threshold(per_comparison_fmr(fpir, n)))] for n in sizes]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImpostorCurve:
        return cls(**{**data, "fmr": tuple(data["fmr"]), "thresholds": tuple(data["thresholds"])})


def calibration_images(root: Path, limit: int = CALIBRATION_IMAGES, every_person: bool = False) -> list[str]:
    """Up to ``limit`` images, at most 4 per identity (many identities): of identities in no View-2 fold of LFW, or
    (``every_person``) of every person of a face folder the model never trained on."""
    from inference.lfw import every_image, images_outside_pairs

    chosen: list[str] = []
    per_id: dict[str, int] = {}
    for path in every_image(root) if every_person else images_outside_pairs(root):
        name = path.split("/")[0]
        if per_id.get(name, 0) < 4:
            per_id[name] = per_id.get(name, 0) + 1
            chosen.append(path)
        if len(chosen) >= limit:
            break
    return chosen


def calibrate(embed: Callable[[np.ndarray], np.ndarray], spec: TransformSpec, lfw: Path,
              limit: int = CALIBRATION_IMAGES, seed: int = 0, unseen: Path | None = None) -> ImpostorCurve:
    """The impostor curve of a model (``embed``: features [B, K, 14, 14] -> embeddings) on calibration images.

    ``unseen``: a face folder laid out as LFW (the CelebA validation set, training_jobs/validation_set.py) none of
    whose people the model trained on. Why: LFW's people in no View-2 fold are TRAINING people of every model trained
    here (training_jobs/datasets.py); a model that separates its training faces better than new ones gets a threshold
    there that accepts more new impostors than its target. Measured (training_jobs/threshold_check.py, docs/sealed.md):
    sealed-v6 calibrated on LFW's no-fold people realised 2x its 1e-3 target on folds 6-10's people and 6-8x on
    CelebA's; calibrated on half the CelebA people it held within 1.7x on the other half."""
    from inference.evaluation import embed_images

    root = unseen if unseen is not None else lfw
    images = calibration_images(root, limit, every_person=unseen is not None)
    if unseen is not None and len(images) < MIN_CALIBRATION_IMAGES:  # a folder the caller chose
        raise ValueError(f"{root}: {len(images)} calibration images, fewer than {MIN_CALIBRATION_IMAGES}")
    vectors = embed_images(root, images, spec, embed, np.random.default_rng(seed))
    emb = np.stack([vectors[path] for path in images])
    people = [p.split("/")[0] for p in images]
    who = (f"every person of {root.name} (none trained on)" if unseen is not None
           else "LFW identities in no View-2 fold")
    source = (f"{who}: {len(images)} images of {len(set(people))} people, transform "
              f"{spec.transform_id}, one noise draw per image (seed {seed})")
    return ImpostorCurve.from_scores(impostor_scores(emb, people), source)
