"""Protected templates: a keyed random rotation of the L2-normalised embedding.

The rotation R is derived from the tenant secret, the model version and the key version:
seed = HMAC-SHA256(tenant_secret, f"{model_version}|{key_version}") -> numpy Generator -> Gaussian
d x d matrix -> QR with the signs of diag(R) folded into Q (a Haar-uniform orthogonal matrix).

- Genuine and impostor cosine scores are unchanged under one key (R is orthogonal), so accuracy is
  exactly that of the unprotected embedding.
- Revocable: a new key version gives an unrelated R, so old templates stop matching new queries.
- Unlinkable: the same face under two keys gives R1 x and R2 x, whose cosine is ~N(0, 1/d).
The secret never leaves the gateway; the parties only ever see additive shares of R x.
"""

from __future__ import annotations

import hashlib
import hmac
from functools import lru_cache

import numpy as np


def key_seed(tenant_secret: bytes, model_version: str, key_version: int) -> int:
    """256-bit integer seed, bound to the model version so templates of two models never align."""
    message = f"{model_version}|{key_version}".encode()
    return int.from_bytes(hmac.new(tenant_secret, message, hashlib.sha256).digest(), "big")


@lru_cache(maxsize=256)
def protection_matrix(tenant_secret: bytes, model_version: str, key_version: int, dim: int) -> np.ndarray:
    """The keyed orthogonal matrix [dim, dim] (float64, read-only; cached because QR costs ~ms)."""
    rng = np.random.default_rng(key_seed(tenant_secret, model_version, key_version))
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    q = q * np.sign(np.diag(r))
    q.setflags(write=False)
    return q


def protect_embedding(embedding: np.ndarray, tenant_secret: bytes, model_version: str,
                      key_version: int) -> np.ndarray:
    """Unit-norm protected template(s), float64; accepts [d] or [B, d]."""
    vector = np.asarray(embedding, dtype=np.float64)
    norm = np.linalg.norm(vector, axis=-1, keepdims=True)
    if not np.all(np.isfinite(vector)) or np.any(norm == 0):
        raise ValueError("embedding must be finite and non-zero")
    matrix = protection_matrix(bytes(tenant_secret), model_version, int(key_version), vector.shape[-1])
    protected: np.ndarray = (vector / norm) @ matrix.T
    return protected
