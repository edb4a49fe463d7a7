"""Decode and validate an uploaded feature payload before anything else touches it."""
from __future__ import annotations

import base64
import binascii
import numpy as np

from app.problems import Problem, invalid_features
from app.schemas import FeaturePayload
from inference.transform import FeatureValidationError, TransformSpec, validate_features

def decode_features(payload: FeaturePayload, spec: TransformSpec) -> np.ndarray:
    """The payload as a float32 [K,14,14] array, or a 422 problem saying exactly what is wrong.

    Freshness and the nonce are checked apart, by `app.services.replay.ReplayGuard`."""
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
    return array.astype(np.float32)


def check_epsilon(payload: FeaturePayload, spec: TransformSpec, epsilon_max: float | None) -> None:
    """The payload must state the ε its transform really applies, and stay within the tenant's policy."""
    applied = spec.epsilon_per_image
    stated = float("inf") if payload.epsilon is None else payload.epsilon
    if not (stated == applied or np.isclose(stated, applied, rtol=1e-6)):
        raise invalid_features(f"epsilon {payload.epsilon} differs from the {applied} this transform applies",
                               "epsilon-mismatch")
    if epsilon_max is not None and applied > epsilon_max:
        raise Problem(422, "epsilon-policy", "Privacy budget above the tenant's policy",
                      f"this transform spends ε={applied:g} per image; the tenant allows at most {epsilon_max:g}")
