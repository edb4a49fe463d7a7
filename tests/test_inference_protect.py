"""Protected templates: orthogonal, score-preserving under one key, revocable, unlinkable across keys."""

from __future__ import annotations

import numpy as np
import pytest

from inference.protect import key_seed, protect_embedding, protection_matrix

SECRET = b"tenant-secret-0123456789abcdef"
D = 128


def embeddings(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, D))


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_matrix_is_orthogonal_deterministic_and_keyed():
    q = protection_matrix(SECRET, "v0", 1, D)
    assert np.allclose(q @ q.T, np.eye(D), atol=1e-10)
    assert np.array_equal(q, protection_matrix(bytes(SECRET), "v0", 1, D))
    assert not q.flags.writeable
    assert key_seed(SECRET, "v0", 1) != key_seed(SECRET, "v0", 2) != key_seed(SECRET, "v1", 1)
    assert key_seed(SECRET, "v0", 1) != key_seed(b"another tenant", "v0", 1)


def test_cosine_scores_are_preserved_under_one_key():
    x = embeddings(50)
    protected = protect_embedding(x, SECRET, "v0", 1)
    assert np.allclose(np.linalg.norm(protected, axis=1), 1.0)
    assert np.allclose(protected @ protected.T, unit(x) @ unit(x).T, atol=1e-12)
    single = protect_embedding(x[3], SECRET, "v0", 1)
    assert np.allclose(single, protected[3])


def test_same_face_under_two_keys_is_unlinkable():
    x = embeddings(400, seed=1)
    first = protect_embedding(x, SECRET, "v0", 1)
    revoked = protect_embedding(x, SECRET, "v0", 2)
    other_tenant = protect_embedding(x, b"other-tenant-secret", "v0", 1)
    for pair in (revoked, other_tenant):
        cross = np.sum(first * pair, axis=1)  # mated scores across keys
        assert abs(cross.mean()) < 0.02 and abs(cross.std() - 1 / np.sqrt(D)) < 0.02
        assert np.max(np.abs(cross)) < 0.45  # far below any usable threshold (~0.3 on genuine 1.0)


def test_bad_embeddings_are_refused():
    with pytest.raises(ValueError):
        protect_embedding(np.zeros(D), SECRET, "v0", 1)
    with pytest.raises(ValueError):
        protect_embedding(np.full(D, np.nan), SECRET, "v0", 1)
