"""Fixed-point encoding in CrypTen's ring: reals <-> int64 with 16 fractional bits.

CrypTen (0.4.1, ``cfg.encoder.precision_bits = 16``) represents a real ``x`` as the integer
``x * 2**16`` in Z_2^64, stored in a two's-complement int64. ``encode`` rounds to the nearest
representable value (CrypTen's own encoder truncates toward zero; the two differ by at most one unit
in the last place, 2**-16, and both decode identically). ``decode`` is exact for |v| < 2**53.
"""
from __future__ import annotations

import numpy as np

PRECISION_BITS = 16
SCALE = 1 << PRECISION_BITS
#: Largest magnitude that encodes without leaving the int64 range (with headroom for a sum of a few).
MAX_ABS = float(2**47)


def encode(x: float | np.ndarray, *, rounding: str = "nearest") -> np.ndarray:
    """Encode a float (array) as int64 fixed point. ``rounding``: 'nearest' (default) or 'trunc' (CrypTen's)."""
    arr = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError("cannot encode non-finite values")
    if arr.size and float(np.max(np.abs(arr))) >= MAX_ABS:
        raise ValueError(f"value out of the fixed-point range (|x| < {MAX_ABS:g})")
    scaled = arr * SCALE
    if rounding == "nearest":
        scaled = np.rint(scaled)
    elif rounding == "trunc":
        scaled = np.trunc(scaled)
    else:
        raise ValueError(f"unknown rounding {rounding!r}")
    return scaled.astype(np.int64)


def decode(v: int | np.ndarray) -> np.ndarray:
    """Decode int64 fixed point to float64 (the inverse of ``encode`` up to the rounding step)."""
    arr = np.asarray(v, dtype=np.int64)
    return arr.astype(np.float64) / SCALE


def decode_product(v: int | np.ndarray) -> np.ndarray:
    """Decode the raw product of two fixed-point numbers (scale 2**32), e.g. an untruncated dot product."""
    arr = np.asarray(v, dtype=np.int64)
    return arr.astype(np.float64) / (SCALE * SCALE)
