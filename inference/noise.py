"""Where the transform's noise comes from: a seeded numpy Generator (training, studies) or ``OsNoise`` (the SDK).

Kept apart from the transform itself, as CrypTen keeps its randomness providers apart from its protocols.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SUBSET_KEY_BYTES = 32


class NoiseSource(Protocol):
    """What add_noise draws from: a numpy Generator (training, studies: seeded, reproducible) or ``OsNoise``."""

    def laplace(self, loc: float, scale: Any) -> np.ndarray: ...

    def normal(self, loc: float, scale: Any) -> np.ndarray: ...

    def random(self, size: tuple[int, ...]) -> np.ndarray: ...


class OsNoise:
    """Laplace, Gaussian and uniform draws from ``os.urandom``: the SDK's privacy noise and channel choice, which
    nothing may predict.

    Why not a seeded numpy Generator: PCG64 is not a cryptographic generator (its state follows from its output),
    and the noise is what protects the features. Uniforms carry 53 random bits; Laplace by the inverse CDF,
    Gaussian by Box-Muller.
    """

    @staticmethod
    def uniform(shape: tuple[int, ...]) -> np.ndarray:
        """Uniform floats in (0, 1) (never exactly 0: logarithms stay finite)."""
        n = int(np.prod(shape)) if shape else 1
        words = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)
        return ((words.astype(np.float64) + 0.5) * 2.0**-53).reshape(shape)

    def random(self, size: tuple[int, ...]) -> np.ndarray:
        """Uniform floats in (0, 1): a random-subset spec ranks them to choose the channels an image releases."""
        return self.uniform(size)

    def laplace(self, loc: float, scale: Any) -> np.ndarray:
        scale = np.asarray(scale, dtype=np.float64)
        u = self.uniform(scale.shape) - 0.5
        draws: np.ndarray = loc - scale * np.sign(u) * np.log1p(-2.0 * np.abs(u))
        return draws

    def normal(self, loc: float, scale: Any) -> np.ndarray:
        scale = np.asarray(scale, dtype=np.float64)
        u1, u2 = self.uniform(scale.shape), self.uniform(scale.shape)
        draws: np.ndarray = loc + scale * np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
        return draws


class PinnedSubsetNoise(OsNoise):
    """``OsNoise`` whose channel choice is fixed by a device key: every image from this device releases the SAME
    random subset of a random-subset spec's channels; the noise stays fresh from ``os.urandom``.

    Why: with a fresh subset per image, a server that gets the same photo twice (a retry, a re-login) or several
    photos of one person merges the subsets and sees more of the spectrum (docs/attacks/README.md, "The same photo
    sent again"); pinned, whatever it merges carries the same channels. The subset is still uniform over devices:
    the key is 32 bytes from ``os.urandom`` and the ranking uniforms are an AES-256-CTR keystream of it whose
    initial counter block holds the channel count in its high half and zeros in its low (block) half: the same key
    and count give the same subset, and specs of different counts read disjoint keystreams.
    """

    def __init__(self, key: bytes) -> None:
        if len(key) != SUBSET_KEY_BYTES:
            raise ValueError(f"a subset key is {SUBSET_KEY_BYTES} bytes, not {len(key)}")
        self._key = bytes(key)

    def __repr__(self) -> str:  # never the key
        return "PinnedSubsetNoise(<key>)"

    def random(self, size: tuple[int, ...]) -> np.ndarray:
        """The same uniforms for every image [..., K]: one keystream vector of K, broadcast over the images."""
        count = int(size[-1])
        nonce = count.to_bytes(8, "big") + bytes(8)
        stream = Cipher(algorithms.AES(self._key), modes.CTR(nonce)).encryptor().update(bytes(8 * count))
        words = np.frombuffer(stream, dtype=np.uint64) >> np.uint64(11)
        return np.broadcast_to((words.astype(np.float64) + 0.5) * 2.0**-53, size).copy()
