"""What the server refuses before a feature array reaches a model: wrong dtype or shape, NaN/inf, values beyond
the transform's bounds, and (for a random-subset spec) more channels than the spec releases per image.

Kept apart from the transform: the SDK never runs these checks, the gateway always does.
"""

from __future__ import annotations

import numpy as np

from inference.transform import FLOAT16_MAX, TransformSpec

# Laplace noise is unbounded; validation accepts |x| up to clip bound + this many noise scales.
# P(|Laplace| > 50 b) = e^-50, so an honest client never trips it, while garbage is still refused.
NOISE_TOLERANCE_SCALES = 50.0


class FeatureValidationError(ValueError):
    """Features the server must refuse; `code` is a short slug (shape, dtype, non-finite, out-of-range, channels)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


def validation_bounds(spec: TransformSpec) -> np.ndarray:
    """Largest |x| the server accepts per channel: clip bound + NOISE_TOLERANCE_SCALES noise scales (noise is
    unbounded: a sanity bound, not a proof of honesty), plus a float16 rounding margin; capped at float16's max."""
    bound = spec.clip_bounds() + NOISE_TOLERANCE_SCALES * spec.noise_scales()
    return np.minimum(bound * (1 + 2 ** -10) + 1e-3, FLOAT16_MAX)


def validate_features(arr: np.ndarray, spec: TransformSpec) -> None:
    """Server-side checks on one decoded feature array; raises FeatureValidationError."""
    if not isinstance(arr, np.ndarray):
        raise FeatureValidationError("dtype", f"expected a numpy array, got {type(arr).__name__}")
    if arr.dtype != np.float16:
        raise FeatureValidationError("dtype", f"dtype {arr.dtype} given, float16 expected")
    if arr.shape != spec.shape:
        raise FeatureValidationError("shape", f"shape {list(arr.shape)} given, {list(spec.shape)} expected")
    values = arr.astype(np.float32)
    if not np.isfinite(values).all():
        raise FeatureValidationError("non-finite", f"{int((~np.isfinite(values)).sum())} values are NaN or inf")
    excess = np.abs(values) > validation_bounds(spec)[:, None, None]
    if excess.any():
        channel = int(np.argwhere(excess)[0][0])
        raise FeatureValidationError(
            "out-of-range", f"{int(excess.sum())} values exceed the transform's bounds (first in channel {channel})")
    check_released_channels(values, spec)


def check_released_channels(values: np.ndarray, spec: TransformSpec) -> None:
    """A random-subset spec releases exactly `random_channels` channels per image, the rest all zeros.

    Why the server checks it: the per-image ε and the attack figures assume that many channels; an SDK that
    sends more leaks more than the tenant chose. With noise every released channel is non-zero (continuous
    noise on 196 values), so the count must be exact; without noise a released channel may be all zeros.
    """
    if spec.random_channels is None:
        return
    released = int(np.count_nonzero(np.abs(values).reshape(spec.num_channels, -1).max(axis=1)))
    if released > spec.random_channels or (spec.noisy and released < spec.random_channels):
        raise FeatureValidationError(
            "channels", f"{released} channels carry values, the transform releases exactly {spec.random_channels}")
