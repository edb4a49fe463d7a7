"""Client-side clipping + server-side Gaussian noise for a DP federated job (FedAvg only; no flwr needed).

What Flower's `DifferentialPrivacyClientSideFixedClipping` + `fixedclipping_mod` do, fitted to privface's
round loop (the wrappers cannot wrap it as they are: a reply's ArrayRecord also carries the client's class
vector, which must not be clipped with the model, and the rounds are privface's own, server_app.run_rounds):
- each client clips its update (local − global) to L2 norm <= `clip` over all travelling parameters (Flower's
  FlatClip, `compute_clip_model_update`) and replies with weight 1, so the mean is unweighted and one
  client moves it by at most clip/n;
- the server adds N(0, (noise_multiplier·clip/n)²) to every coordinate of the mean of the n replies (Flower
  divides by the number sampled; n replied is what the mean is over, so the noise on the sum is exactly
  noise_multiplier·clip);
- the noise comes from a ChaCha20 keystream keyed by os.urandom (Flower draws it with numpy's global Mersenne
  Twister, `np.random.normal`, whose state can be recovered from its output — and with it the noise).
- the spread-out step is skipped: it moves every client's class vector by the others', so one client's data
  would reach other clients' updates outside the clipping bound, and the accounting would not hold.
What the (ε, δ) of accountant.py covers: the sequence of global models (what every client receives and the
gateway serves), against anyone who sees them. It does not cover what the server itself sees (each client's
update and class vector in clear under FedAvg), nor the class vectors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms


@dataclass(frozen=True)
class DpSettings:
    clip: float  # L2 bound of one client's update, over every travelling parameter
    noise_multiplier: float  # noise std on the sum of updates / clip
    delta: float = 1e-5

    def __post_init__(self) -> None:
        if not self.clip > 0 or not self.noise_multiplier >= 0 or not 0 < self.delta < 1:
            raise ValueError("dp needs clip > 0, noise_multiplier >= 0 and 0 < delta < 1")


def clip_update(local: dict[str, np.ndarray], received: dict[str, np.ndarray], clip: float
                ) -> tuple[dict[str, np.ndarray], float]:
    """received + (local − received) scaled to L2 norm <= clip; returns (clipped parameters, update norm)."""
    deltas = {name: local[name].astype(np.float64) - received[name] for name in received}
    norm = float(np.sqrt(sum(float(np.sum(d * d)) for d in deltas.values())))
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return {name: (received[name] + scale * d).astype(np.float32) for name, d in deltas.items()}, norm


def csprng_gaussian(count: int, key: bytes | None = None) -> np.ndarray:
    """`count` standard normal float64 draws from a ChaCha20 keystream (key: os.urandom(32) unless given, for
    tests), by Box-Muller on 53-bit uniforms in (0, 1]."""
    pairs = (count + 1) // 2
    stream = Cipher(algorithms.ChaCha20(key or os.urandom(32), bytes(16)), mode=None).encryptor().update(
        bytes(16 * pairs))
    words = np.frombuffer(stream, dtype="<u8") >> np.uint64(11)
    uniform = (words.astype(np.float64) + 1.0) / 2.0 ** 53  # (0, 1]: log never sees 0
    u1, u2 = uniform[0::2], uniform[1::2]
    radius = np.sqrt(-2.0 * np.log(u1))
    pairs_out = np.stack([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)], axis=1)
    return pairs_out.ravel()[:count]  # interleaved: the first draws do not depend on `count`


def add_noise(mean: dict[str, np.ndarray], settings: DpSettings, replied: int,
              key: bytes | None = None) -> tuple[dict[str, np.ndarray], float]:
    """mean + N(0, (σ·clip/replied)²) per coordinate, from one CSPRNG stream; returns (noised, the std)."""
    std = settings.noise_multiplier * settings.clip / max(1, replied)
    if std == 0:
        return dict(mean), 0.0
    sizes = [int(v.size) for v in mean.values()]
    noise = csprng_gaussian(sum(sizes), key) * std
    out, start = {}, 0
    for (name, value), size in zip(mean.items(), sizes):
        out[name] = (value + noise[start:start + size].reshape(value.shape)).astype(np.float32)
        start += size
    return out, std
