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

    Each block of 64 elements is a 64 x 64 bit matrix; transposing it (6 rounds of masked shifts and swaps,
    all blocks at once through reshaped views) gives the 64 bit rows of the block.
    """
    count = int(x.shape[0])
    blocks = np.zeros((n_words(count), 64), dtype=np.uint64)
    blocks.reshape(-1)[:count] = x
    _transpose_blocks_inplace(blocks)
    return np.ascontiguousarray(blocks.T[:nbits])


def _transpose_blocks_inplace(a: np.ndarray) -> None:
    """Transpose every 64 x 64 bit block a[w] (row k = word k, column j = bit j) in place."""
    words = a.shape[0]
    j = 32
    mask = np.uint64(0x00000000FFFFFFFF)
    while j:
        view = a.reshape(words, 64 // (2 * j), 2, j)
        lo, hi = view[:, :, 0, :], view[:, :, 1, :]   # rows whose bit j is 0 / 1
        shift = np.uint64(j)
        t = ((lo >> shift) ^ hi) & mask
        hi ^= t
        lo ^= t << shift
        j //= 2
        if j:
            mask ^= mask << np.uint64(j)


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
