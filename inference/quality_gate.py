"""Quality gate: does a received feature array carry a face at all?

Why: the matcher embeds whatever it is sent, and an embedding of nothing (all-zero features, a grey frame, sensor
noise) still lands near some enrolled template; before this gate 83 of 83 such inputs matched someone (issue 10).
The gateway only ever sees the transformed features, so the check works on them alone.

What it measures (`face_evidence`), per feature array, in units the transform itself defines:

- band energies: each kept channel is divided by its face std (``spec.channel_std``) and its spatial variance over
  the 14x14 blocks is taken (centred, so a constant plane counts as empty). Luma channels are grouped into
  ``LUMA_BANDS`` bands of neighbouring zig-zag frequencies, chroma into one Cb and one Cr band; the feature is the
  log mean variance of each band. A face sits near 0 in every band (the stds were measured on faces); the noise
  alone sits at the transform's known floor, 2*(2*clip_sigmas/epsilon)^2 for Laplace (-3.5 at the served ε 64);
  white noise images are far above it in the high bands; blur and gradients have nothing there.
- layout: the map of energy per block (log, lower half of the luma bands) correlated with the mean map of training
  faces: aligned faces put their detail at the eyes, nose and mouth, a texture spreads it evenly or elsewhere.
- symmetry: that map correlated with its mirror image (aligned faces are roughly left-right symmetric).
- contrast: the spread (std) of that log energy map: faces mix flat cheeks with detailed eyes.
- tails: mean |z| / rms of the luma coefficients: face DCT coefficients are sparse (heavy-tailed), noise is not.

A logistic regression over these (standardised) features, fitted per transform preset on training-identity faces
against synthetic non-faces (`training_jobs/quality_gate.py`, docs/quality_gate.md), gives a face score; below
the preset's threshold the payload is refused. Weights live in ``inference/transforms/quality_gate.json``, keyed by
the spec's params_hash (the exact channels, stds and noise), so a gate is never applied to features it was not
fitted for: an unknown transform has no gate (`gate_for` returns None) and the caller decides.

This is a quality check against honest mistakes and garbage, not a security boundary: the caller controls the
features and can always send the features of some real face. Nothing here reads a field the caller declares.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from inference.transform import ZIGZAG, TransformSpec, kept_index

GATE_PATH = Path(__file__).parent / "transforms" / "quality_gate.json"
LUMA_BANDS = 6
ENERGY_FLOOR = 1e-4  # in units of the face variance: keeps log finite for all-zero features (noise alone is ~3e-2)
FEATURE_NAMES = tuple([f"log_energy_luma_band{i}" for i in range(LUMA_BANDS)]
                      + ["log_energy_cb", "log_energy_cr", "layout_correlation", "layout_symmetry", "layout_contrast",
                         "luma_tail_ratio"])


def luma_bands(spec: TransformSpec) -> list[np.ndarray]:
    """Feature-channel indices of the luma channels, in zig-zag order, split into LUMA_BANDS contiguous bands."""
    colours, freqs = kept_index(spec)
    luma = [i for i in np.argsort([ZIGZAG.index(int(f)) for f in freqs], kind="stable") if colours[i] == 0]
    return [band for band in np.array_split(np.array(luma), LUMA_BANDS) if band.size]


def noise_variance(spec: TransformSpec) -> float:
    """Variance the transform's noise adds to every coefficient, in units of that channel's face variance."""
    if not spec.noisy:
        return 0.0
    relative = spec.noise_scales() / np.asarray(spec.channel_std)
    factor = 2.0 if spec.mechanism == "laplace" else 1.0  # Var(Laplace(b)) = 2 b^2
    return float(np.mean(factor * relative ** 2))


def normalised(features: np.ndarray, spec: TransformSpec) -> np.ndarray:
    """Features [..., K, 14, 14] divided by each channel's face std (float64)."""
    return np.asarray(np.asarray(features, dtype=np.float64) / np.asarray(spec.channel_std)[:, None, None])


def log_layout(z: np.ndarray, spec: TransformSpec) -> np.ndarray:
    """Log mean energy per block of the lower half of the luma bands, [..., 14, 14]: where in the face the detail
    is. The lower bands carry the face's structure; camera noise, relative to a face, lives in the upper ones."""
    lower = np.concatenate(luma_bands(spec)[:LUMA_BANDS // 2])
    return np.asarray(np.log((z[..., lower, :, :] ** 2).mean(axis=-3) + ENERGY_FLOOR))


def spectral_evidence(features: np.ndarray, spec: TransformSpec) -> tuple[np.ndarray, np.ndarray]:
    """What needs no reference: (FEATURE_NAMES but the layout correlation [..., F-1]; the log layout [..., 196]).
    Split out so that a fit can build the reference (the faces' mean layout) first.

    Symmetry: the layout correlated with its own mirror image. An aligned face is roughly left-right symmetric and
    the 14-block grid is symmetric about the face's centre line (x = 56), so a face scores high; noise, textures and
    shuffled blocks score near 0 whatever their spectrum."""
    z = normalised(features, spec)
    variance = z.reshape(*z.shape[:-2], -1).var(axis=-1)  # [..., K], centred: constants count as empty
    colours, _ = kept_index(spec)
    groups = luma_bands(spec) + [np.flatnonzero(colours == 1), np.flatnonzero(colours == 2)]
    bands = [np.log(variance[..., g].mean(axis=-1) + ENERGY_FLOOR) for g in groups]
    grid = log_layout(z, spec)
    layout = grid.reshape(*grid.shape[:-2], -1)
    symmetry = correlation(layout, grid[..., ::-1].reshape(layout.shape))
    luma = z[..., colours == 0, :, :].reshape(*z.shape[:-3], -1)
    tail = np.abs(luma).mean(axis=-1) / (np.sqrt((luma ** 2).mean(axis=-1)) + 1e-12)
    return np.stack([*bands, symmetry, layout.std(axis=-1), tail], axis=-1), layout


def correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation along the last axis (0 when either side is constant)."""
    a = a - a.mean(axis=-1, keepdims=True)
    b = b - b.mean(axis=-1, keepdims=True)
    return np.asarray((a * b).sum(axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12))


def with_layout(spectral: np.ndarray, layout: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Insert the correlation of each log layout with the reference (faces' mean) -> [..., F]."""
    match = correlation(layout, np.broadcast_to(reference, layout.shape))
    return np.concatenate([spectral[..., :-3], match[..., None], spectral[..., -3:]], axis=-1)


def face_evidence(features: np.ndarray, spec: TransformSpec, layout_reference: np.ndarray) -> np.ndarray:
    """The gate's input features (FEATURE_NAMES) of one or many arrays [..., K, 14, 14] -> [..., F]."""
    return with_layout(*spectral_evidence(features, spec), layout_reference)


@dataclass(frozen=True)
class QualityGate:
    """A fitted gate for one transform: standardisation, logistic weights and the decision threshold."""

    params_hash: str
    layout_reference: np.ndarray  # [196] mean log luma energy per block of training faces
    mean: np.ndarray  # [F] standardisation of face_evidence
    scale: np.ndarray  # [F]
    weights: np.ndarray  # [F]
    bias: float
    threshold: float  # on the logit: at or above = a face

    def logit(self, features: np.ndarray, spec: TransformSpec) -> np.ndarray:
        """Face score (log-odds) of one array [K,14,14] (a float) or of many [N,K,14,14] ([N])."""
        evidence = face_evidence(features, spec, self.layout_reference)
        return np.asarray(((evidence - self.mean) / self.scale) @ self.weights + self.bias)

    def is_face(self, features: np.ndarray, spec: TransformSpec) -> bool:
        return bool(self.logit(features, spec) >= self.threshold)

    def to_dict(self) -> dict[str, Any]:
        def r(a: np.ndarray) -> list[float]:
            return [float(f"{v:.6g}") for v in np.ravel(a)]
        return {"params_hash": self.params_hash, "features": list(FEATURE_NAMES), "mean": r(self.mean),
                "scale": r(self.scale), "weights": r(self.weights), "bias": float(f"{self.bias:.6g}"),
                "threshold": float(f"{self.threshold:.6g}"), "layout_reference": r(self.layout_reference)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QualityGate":
        if list(data["features"]) != list(FEATURE_NAMES):
            raise ValueError(f"gate for {data['params_hash']} was fitted on other features: {data['features']}")
        return cls(str(data["params_hash"]), np.asarray(data["layout_reference"], dtype=np.float64),
                   np.asarray(data["mean"], dtype=np.float64), np.asarray(data["scale"], dtype=np.float64),
                   np.asarray(data["weights"], dtype=np.float64), float(data["bias"]), float(data["threshold"]))


@lru_cache(maxsize=4)
def load_gates(path: Path = GATE_PATH) -> dict[str, QualityGate]:
    """Every committed gate, by params_hash (empty if the file is absent)."""
    if not Path(path).exists():
        return {}
    record = json.loads(Path(path).read_text())
    return {gate["params_hash"]: QualityGate.from_dict(gate) for gate in record["gates"].values()}


def gate_for(spec: TransformSpec, path: Path = GATE_PATH) -> QualityGate | None:
    """The gate fitted for exactly this transform (same params_hash), or None."""
    return load_gates(path).get(spec.params_hash)

