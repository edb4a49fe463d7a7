"""The value ranges the match protocol can represent, checked wherever the values exist in the clear.

Templates and queries are unit vectors in 16-bit fixed point (``secure.fixedpoint``): every coordinate is
at most 2^16 in magnitude and the squared norm is about 2^32, so every score lies in [-1, 1] (scale 2^32).
The dealer-bits comparison reads ``score - threshold`` modulo 2^38 (``correlations.N_BITS``), i.e. it is
right only while |score - threshold| < 32. A threshold outside [-1, 1] is meaningless for cosine scores and,
beyond ~31, wraps (T = 40 would read as -24 and match everything), so it is refused; so are vectors whose
scores could leave the range (a scaled query would turn a fixed threshold into a chosen one).
A party only ever holds uniform shares, so the vector check runs at the gateway before splitting.
"""
from __future__ import annotations

import math

import numpy as np

from secure.fixedpoint import SCALE

THRESHOLD_MIN = -1.0
THRESHOLD_MAX = 1.0
#: Largest accepted squared norm of a fixed-point vector: a unit vector plus rounding slack (1e-3 relative).
MAX_NORM2 = int(SCALE * SCALE * 1.001)


def check_threshold(threshold: float) -> float:
    """The threshold as a float if finite and within [-1, 1]; else ValueError (never silently clipped)."""
    value = float(threshold)
    if not math.isfinite(value):
        raise ValueError("threshold must be finite")
    if not THRESHOLD_MIN <= value <= THRESHOLD_MAX:
        raise ValueError(f"threshold must lie in [{THRESHOLD_MIN:g}, {THRESHOLD_MAX:g}], got {value!r}")
    return value


def check_unit_fixed(vector: np.ndarray) -> np.ndarray:
    """A fixed-point int64 vector ([d] or [Q, d]) whose rows are at most unit length; else ValueError."""
    arr = np.asarray(vector)
    if arr.dtype != np.int64:
        raise ValueError("expected an int64 fixed-point vector")
    if arr.size and float(np.max(np.abs(arr.astype(np.float64)))) > SCALE:
        raise ValueError("a coordinate is outside the fixed-point range of a unit vector (|v_i| <= 1)")
    rows = arr.reshape(-1, arr.shape[-1]).astype(np.float64) if arr.ndim else arr.reshape(1, 1).astype(np.float64)
    # exact in float64: each square <= 2^32 (checked above), so a sum over d < 2^21 coordinates is < 2^53
    if rows.size and float(np.max(np.einsum("ij,ij->i", rows, rows))) > MAX_NORM2:
        raise ValueError("the vector is longer than a unit vector in fixed point")
    return arr
