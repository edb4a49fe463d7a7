"""The cryptographic PRG shared between one party and the dealer: AES-128 in counter mode.

Why not CrypTen's generators: those are torch Mersenne-Twister streams whose seed is cut to 32 bits, so a party
that knows its own seed can search the dealer's generator state and replay the other party's masks
(``tests/test_mpc_csprng.py::test_old_construction_lets_party_0_recover_party_1_stream``). Every random value
that protects data comes from here instead:

* each party and the dealer agree on a 256-bit session key per MPC session (``link_keys.py``: ephemeral X25519,
  authenticated with the link's credential; the key itself never travels);
* ``derive_key(session_key, purpose)`` (HKDF-SHA256) gives one AES key per purpose, so the score step, CrypTen's
  Beaver triples and the comparison never share a keystream (``PURPOSE_*``);
* ``RingGenerator`` serves CrypTen-shaped draws (ring elements, k-bit values) from one such stream
  (``crypten_rng.py`` routes CrypTen's TTP provider through it); the comparison (``compare.py``) uses a new
  ``AesCtrStream`` stream id per job, so no keystream block is ever used twice.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 16
DEALER_RANK = 2
# purposes of the keys derived from one party-dealer session key (domain separation)
PURPOSE_TTP = "privface/mpc/ttp-stream/v1"           # fixed-gallery masks and CrypTen's triples (one stream)
PURPOSE_TTP_CUDA = "privface/mpc/ttp-stream-cuda/v1"  # the same draws made for a CUDA device
PURPOSE_COMPARE = "privface/mpc/compare/v1"           # dealer-bits comparison, one stream id per job
_ZERO_BLOCK_BYTES = 1 << 20
_ZEROS = memoryview(bytes(_ZERO_BLOCK_BYTES))


class AesCtrStream:
    """Uniform 64-bit words from AES-CTR(key) starting at block (stream_id, 0)."""

    def __init__(self, key: bytes, stream_id: int) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError("PRG key must be 16 bytes")
        if not 0 <= stream_id < 2**64:
            raise ValueError("stream id out of range")
        counter = stream_id.to_bytes(8, "big") + bytes(8)  # high half: stream, low half: block counter
        self._enc = Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor()

    def u64(self, count: int) -> np.ndarray:
        """The next ``count`` words (uint64, writable).

        The keystream is written straight into the result, 1 MiB at a time from one shared zero block: a fresh
        zero input as large as the output would cost as much in page faults as the AES itself.
        """
        if count <= 0:
            return np.zeros(0, dtype=np.uint64)
        out = np.empty(count + 2, dtype=np.uint64)  # update_into wants room for one block more than its input
        view = out.view(np.uint8).data
        total = 8 * count
        for start in range(0, total, _ZERO_BLOCK_BYTES):
            size = min(_ZERO_BLOCK_BYTES, total - start)
            self._enc.update_into(_ZEROS[:size], view[start:start + size + 15])
        return out[:count]


def new_key() -> bytes:
    return os.urandom(KEY_BYTES)


def derive_key(session_key: bytes, purpose: str) -> bytes:
    """The AES key of one ``purpose`` under a session key (HKDF-SHA256; purposes never share a key)."""
    if len(session_key) < KEY_BYTES:
        raise ValueError("session key too short")
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None,
                info=purpose.encode()).derive(session_key)


class RingGenerator:
    """CrypTen-shaped random draws (int64 ring elements, k-bit values) from one AES-CTR stream.

    Stands where CrypTen keeps a ``torch.Generator``: the party and the dealer hold one each for the same key and
    draw the same values in the same order. ``device`` is where results go (the keystream is made on the CPU).
    """

    def __init__(self, key: bytes, device: Any = "cpu") -> None:
        import torch

        self.device = torch.device(device)
        self._stream = AesCtrStream(key, 0)

    def ring(self, size: Any) -> Any:
        """Uniform int64 (all 2^64 values) of shape ``size``."""
        import torch

        shape = torch.Size(size if isinstance(size, (tuple, list, torch.Size)) else (size,))
        words = self._stream.u64(shape.numel()).view(np.int64)
        return self._place(torch.from_numpy(words).reshape(shape))

    def kbit(self, size: Any, bits: int) -> Any:
        """Uniform values in [0, 2^bits) of shape ``size`` (the top ``bits`` bits of fresh words)."""
        import torch

        if not 1 <= bits <= 64:
            raise ValueError("bit length out of range")
        if bits == 64:
            return self.ring(size)
        shape = torch.Size(size if isinstance(size, (tuple, list, torch.Size)) else (size,))
        words = (self._stream.u64(shape.numel()) >> np.uint64(64 - bits)).view(np.int64)
        return self._place(torch.from_numpy(words).reshape(shape))

    def _place(self, t: Any) -> Any:
        if self.device.type == "cpu":
            return t
        from crypten.cuda import CUDALongTensor

        return CUDALongTensor(t.to(self.device))
