"""A cryptographic PRG shared between one party and the dealer: AES-128 in counter mode.

Why not CrypTen's generators: those are torch Mersenne-Twister streams seeded with 64 bits, fine for CrypTen's
own circuit but predictable from their output. The comparison protocol (``compare.py``) draws its masks from
AES-CTR keyed with 128 fresh random bits that each party sends the dealer when a session starts
(``exchange_keys``). Every job uses a new stream id, so no keystream block is ever used twice.
"""
from __future__ import annotations

import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

KEY_BYTES = 16
DEALER_RANK = 2
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
        view = memoryview(out.view(np.uint8))
        total = 8 * count
        for start in range(0, total, _ZERO_BLOCK_BYTES):
            size = min(_ZERO_BLOCK_BYTES, total - start)
            self._enc.update_into(_ZEROS[:size], view[start:start + size + 15])
        return out[:count]


def new_key() -> bytes:
    return os.urandom(KEY_BYTES)


def send_key_to_dealer(key: bytes) -> None:
    """Party side, once per session (gloo default group, point to point)."""
    import torch
    import torch.distributed as dist

    dist.send(torch.frombuffer(bytearray(key), dtype=torch.uint8), dst=DEALER_RANK)


def receive_party_keys() -> list[bytes]:
    """Dealer side, once per session: the PRG key of party 0, then of party 1."""
    import torch
    import torch.distributed as dist

    keys = []
    for rank in (0, 1):
        buf = torch.empty(KEY_BYTES, dtype=torch.uint8)
        dist.recv(buf, src=rank)
        keys.append(bytes(buf.numpy()))
    return keys
