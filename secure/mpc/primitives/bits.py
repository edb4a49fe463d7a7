"""Bit-sliced words: bit j of element k lives in bit (k mod 64) of word k // 64 of row j.

The comparison circuit works on all elements at once, 64 per machine word, so an AND gate over a whole
tournament level is a handful of numpy operations on uint64 arrays. Little-endian byte order is assumed
(x86-64, aarch64).
"""
from __future__ import annotations

import sys

import numpy as np

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("secure.mpc.primitives.bits assumes a little-endian machine")


def n_words(count: int) -> int:
    """Words needed for ``count`` bits."""
    return (int(count) + 63) // 64


def bitslice(x: np.ndarray, nbits: int) -> np.ndarray:
    """uint64 [E] -> uint64 [nbits, W]: row j holds bit j of every element (padding bits are 0).

    Byte column by byte column: bit k of each element's byte is isolated (uint8, one pass) and ``np.packbits``
    packs it 8 elements to a byte, little-endian, so 8 consecutive bytes form the row's 64-element word. About
    6x faster here than transposing 64 x 64 bit blocks with masked shifts.
    """
    count = int(x.shape[0])
    as_bytes = np.ascontiguousarray(x, dtype=np.uint64).view(np.uint8).reshape(count, 8)
    out = np.zeros((nbits, 8 * n_words(count)), dtype=np.uint8)
    packed = (count + 7) // 8
    bit = np.empty(count, dtype=np.uint8)
    for byte in range((nbits + 7) // 8):
        column = np.ascontiguousarray(as_bytes[:, byte])
        for k in range(min(8, nbits - 8 * byte)):
            np.right_shift(column, k, out=bit)
            bit &= 1
            out[8 * byte + k, :packed] = np.packbits(bit, bitorder="little")
    return out.view(np.uint64)


def unbitslice(words: np.ndarray, count: int) -> np.ndarray:
    """uint64 [W] -> uint64 [count] of 0/1 (one bit row back to one value per element)."""
    return unbitslice_bool(words, count).astype(np.uint64)


def unbitslice_bool(words: np.ndarray, count: int) -> np.ndarray:
    """uint64 [W] -> bool [count] (a view of the unpacked bytes, no further copy)."""
    return np.unpackbits(np.ascontiguousarray(words).view(np.uint8), bitorder="little")[:count].view(bool)


def tree_pairs(width: int) -> list[int]:
    """Pairs combined at each level of a binary reduction over ``width`` bit positions (odd tops pass up)."""
    out = []
    while width > 1:
        out.append(width // 2)
        width = width // 2 + width % 2
    return out
