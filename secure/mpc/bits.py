"""Bit-sliced words: bit j of element k lives in bit (k mod 64) of word k // 64 of row j.

The comparison circuit works on all elements at once, 64 per machine word, so an AND gate over a whole
tournament level is a handful of numpy operations on uint64 arrays. Little-endian byte order is assumed
(x86-64, aarch64).
"""
from __future__ import annotations

import sys

import numpy as np

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("secure.mpc.bits assumes a little-endian machine")


def n_words(count: int) -> int:
    """Words needed for ``count`` bits."""
    return (int(count) + 63) // 64


def bitslice(x: np.ndarray, nbits: int) -> np.ndarray:
    """uint64 [E] -> uint64 [nbits, W]: row j holds bit j of every element (padding bits are 0).

    Only the bytes holding the low ``nbits`` are unpacked, packed along the element axis, then transposed as
    bytes (8x less data to move than transposing bits).
    """
    count = int(x.shape[0])
    padded = np.zeros(n_words(count) * 64, dtype=np.uint64)
    padded[:count] = x
    low_bytes = padded.view(np.uint8).reshape(-1, 8)[:, :(nbits + 7) // 8]
    bits = np.unpackbits(low_bytes, axis=1, bitorder="little")[:, :nbits]   # [E', nbits]
    packed = np.packbits(bits, axis=0, bitorder="little")                    # [E'/8, nbits]
    return np.ascontiguousarray(packed.T).view(np.uint64)                    # [nbits, W]


def unbitslice(words: np.ndarray, count: int) -> np.ndarray:
    """uint64 [W] -> uint64 [count] of 0/1 (one bit row back to one value per element)."""
    return np.unpackbits(np.ascontiguousarray(words).view(np.uint8), bitorder="little")[:count].astype(np.uint64)


def tree_pairs(width: int) -> list[int]:
    """Pairs combined at each level of a binary reduction over ``width`` bit positions (odd tops pass up)."""
    out = []
    while width > 1:
        out.append(width // 2)
        width = width // 2 + width % 2
    return out
