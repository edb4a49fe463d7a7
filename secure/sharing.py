"""Two-party additive secret sharing over Z_2^64 (CrypTen's arithmetic shares).

``split(x) -> (s0, s1)`` with ``s0`` drawn uniformly from a CSPRNG (``os.urandom``) and
``s1 = x - s0 (mod 2**64)``; either share alone is uniform and independent of ``x``.
Arithmetic is done on uint64 views, so it wraps modulo 2**64 without overflow warnings.
Serialisation is little-endian int64 bytes (``to_bytes`` / ``from_bytes``), base64 on the wire.
"""
from __future__ import annotations

import base64
import os
from collections.abc import Callable

import numpy as np

RING_BITS = 64
RING = 1 << RING_BITS
_LE_I8 = np.dtype("<i8")


def random_ring(shape: int | tuple[int, ...], randbytes: Callable[[int], bytes] = os.urandom) -> np.ndarray:
    """Uniform int64 ring elements from a CSPRNG (``randbytes`` is overridable for tests only)."""
    shape_t = (shape,) if isinstance(shape, int) else tuple(shape)
    count = int(np.prod(shape_t, dtype=np.int64)) if shape_t else 1
    raw = randbytes(8 * count)
    if len(raw) != 8 * count:
        raise RuntimeError("random source returned too few bytes")
    return np.frombuffer(raw, dtype=_LE_I8).astype(np.int64).reshape(shape_t)


def _as_int64(x: np.ndarray | int) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype != np.int64:
        if not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"shares are int64 ring elements, got {arr.dtype}")
        arr = arr.astype(np.int64)
    return np.ascontiguousarray(arr)


def split(x: np.ndarray, randbytes: Callable[[int], bytes] = os.urandom) -> tuple[np.ndarray, np.ndarray]:
    """Split an int64 array into two additive shares: ``reconstruct(*split(x)) == x``."""
    arr = _as_int64(x)
    s0 = random_ring(arr.shape, randbytes)
    s1 = (arr.view(np.uint64) - s0.view(np.uint64)).view(np.int64)
    return s0, s1


def reconstruct(s0: np.ndarray | int, s1: np.ndarray | int) -> np.ndarray:
    """``s0 + s1 mod 2**64`` as int64."""
    a, b = _as_int64(s0), _as_int64(s1)
    return (a.view(np.uint64) + b.view(np.uint64)).view(np.int64)


def reconstruct_int(s0: int, s1: int) -> int:
    """Reconstruct a scalar output from two Python ints (each any representative mod 2**64), signed."""
    v = (int(s0) + int(s1)) % RING
    return v - RING if v >= RING // 2 else v


def to_bytes(share: np.ndarray) -> bytes:
    return _as_int64(share).astype(_LE_I8, copy=False).tobytes()


def from_bytes(data: bytes, dim: int | None = None) -> np.ndarray:
    if len(data) % 8:
        raise ValueError("share bytes must be a multiple of 8")
    arr = np.frombuffer(data, dtype=_LE_I8).astype(np.int64)
    if dim is not None and arr.size != dim:
        raise ValueError(f"expected {dim} ring elements, got {arr.size}")
    return arr


def to_b64(share: np.ndarray) -> str:
    return base64.b64encode(to_bytes(share)).decode("ascii")


def from_b64(text: str, dim: int | None = None) -> np.ndarray:
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as exc:
        raise ValueError("share is not valid base64") from exc
    return from_bytes(raw, dim)
