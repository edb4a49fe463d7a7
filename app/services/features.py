"""Decode and validate an uploaded feature payload before anything else touches it."""
from __future__ import annotations

import base64
import binascii
import logging
from functools import lru_cache

import numpy as np

from app.problems import Problem, invalid_features
from app.schemas import FeaturePayload, SealedPayload
from inference.feature_checks import FeatureValidationError, validate_features
from inference.quality_gate import QualityGate, gate_for
from inference.transform import TransformSpec

log = logging.getLogger(__name__)
NO_FACE_SLUG = "no-face-in-features"

def decode_features(payload: FeaturePayload, spec: TransformSpec, quality_gate: bool = True) -> np.ndarray:
    """The payload as a float32 [K,14,14] array, or a 422 problem saying exactly what is wrong.

    With `quality_gate`, features that carry no face are refused too (`check_face`). Freshness and the nonce are
    checked apart, by `app.services.replay.ReplayGuard`, after this: a refused payload does not spend its nonce."""
    expected = list(spec.shape)
    if payload.shape != expected:
        raise invalid_features(f"shape {payload.shape} does not match the transform's {expected}", "invalid-shape")
    try:
        raw = base64.b64decode(payload.data, validate=True)
    except (binascii.Error, ValueError):
        raise invalid_features("data is not valid base64", "invalid-encoding") from None
    if len(raw) != int(np.prod(expected)) * 2:
        raise invalid_features(f"data holds {len(raw)} bytes; {int(np.prod(expected)) * 2} expected for "
                               f"{expected} float16", "invalid-shape")
    array = np.frombuffer(raw, dtype="<f2").reshape(expected)
    try:
        validate_features(array, spec)
    except FeatureValidationError as exc:
        raise invalid_features(exc.detail, f"invalid-{exc.code}") from None
    features = array.astype(np.float32)
    if quality_gate:
        check_face(features, spec)
    return features


def no_face(score: float, threshold: float) -> Problem:
    return Problem(422, NO_FACE_SLUG, "No face in the features",
                   f"the features carry no face (face score {score:.1f} < {threshold:.1f}): their energy and layout "
                   "are those of an empty, flat, noisy or blurred frame, not of an aligned face. Send the features "
                   "of a detected, aligned face (the SDK does both); nothing was stored or matched")


def check_face(features: np.ndarray, spec: TransformSpec) -> None:
    """Refuse features without a face (docs/quality_gate.md) before they are embedded and matched: an embedding of
    nothing still lands near some template (issue 10: 83 of 83 non-face inputs matched someone). A quality check
    against mistakes, not a security boundary: a caller can always send the features of some real face."""
    gate = _gate(spec)
    if gate is None:
        return
    score = float(gate.logit(features, spec))
    if score < gate.threshold:
        raise no_face(score, gate.threshold)


@lru_cache(maxsize=8)
def _gate(spec: TransformSpec) -> QualityGate | None:
    """The gate fitted for this exact transform; a transform without one is served ungated (logged once)."""
    gate = gate_for(spec)
    if gate is None:
        log.warning("no quality gate is fitted for transform %s/%s: features are not checked for a face "
                    "(python -m training_jobs.quality_gate fit)", spec.transform_id, spec.params_hash)
    return gate


def check_epsilon(payload: FeaturePayload | SealedPayload, spec: TransformSpec, epsilon_max: float | None) -> None:
    """The payload must state the ε its transform really applies, and stay within the tenant's policy."""
    applied = spec.epsilon_per_image
    stated = float("inf") if payload.epsilon is None else payload.epsilon
    if not (stated == applied or np.isclose(stated, applied, rtol=1e-6)):
        raise invalid_features(f"epsilon {payload.epsilon} differs from the {applied} this transform applies",
                               "epsilon-mismatch")
    if epsilon_max is not None and applied > epsilon_max:
        raise Problem(422, "epsilon-policy", "Privacy budget above the tenant's policy",
                      f"this transform spends ε={applied:g} per image; the tenant allows at most {epsilon_max:g}")
