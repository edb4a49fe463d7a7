"""Random channel subsets (PartialFace-style, issue 10): a spec that releases N of its K channels per image.

What must hold: the subset is fresh per image and uniform, drawn from os.urandom in the SDK; the released channels
are exactly the full spec's; the per-image ε counts only released coefficients; older specs keep their hashes; the
server refuses an upload that carries more (or, with noise, fewer) channels than the spec releases.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from scipy import stats

from client.features import decode_features, encode_features, fresh_rng
from inference import feature_checks as FC
from inference import transform as T

K = T.spec_low(8).num_channels  # 66
N = 33


def faces(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 112, 112, 3), dtype=np.uint8)


def subset_spec(epsilon: float | None = 64.0, keep: int = N) -> T.TransformSpec:
    return dataclasses.replace(T.spec_low(8, epsilon), random_channels=keep)


def released(features: np.ndarray) -> np.ndarray:
    """[..., K] True where a channel carries any value."""
    return np.abs(features.astype(np.float32)).max(axis=(-1, -2)) > 0


def test_the_spec_names_hashes_and_accounts_for_the_subset():
    full, subset = T.spec_low(8), subset_spec()
    assert full.params_hash == "48727ba4d499d7d1"  # an older spec's hash is unchanged by the new field
    assert subset.params_hash != full.params_hash and subset.transform_id == full.transform_id + "-r33"
    assert T.TransformSpec.from_dict(json.loads(json.dumps(subset.to_dict()))) == subset
    assert subset.epsilon_per_image == N * T.POSITIONS * 64.0 == full.epsilon_per_image * N / K
    assert subset.with_epsilon(16.0).random_channels == N
    for keep in (0, K, -1):
        with pytest.raises(ValueError, match="random_channels must be in 1..65"):
            subset_spec(keep=keep)


def test_released_channels_are_the_full_specs_and_the_rest_are_zeros():
    batch = faces(40)
    full = T.apply(batch, T.spec_low(8), np.random.default_rng(5))
    subset = T.apply(batch, subset_spec(), np.random.default_rng(5))  # the same noise draw, then the subset
    mask = released(subset)
    assert (mask.sum(axis=1) == N).all()
    assert np.array_equal(subset[mask], full[mask]) and not subset[~mask].any()
    assert len({tuple(row) for row in mask}) == len(batch)  # a fresh subset per image


def test_the_sdk_draws_each_subset_from_the_os_uniformly():
    spec = subset_spec()
    masks = np.stack([released(spec.apply(faces(1)[0], fresh_rng())) for _ in range(300)])
    assert (masks.sum(axis=1) == N).all()
    counts = masks.sum(axis=0)  # each channel is released with probability N/K
    assert stats.chisquare(counts, np.full(K, counts.sum() / K)).pvalue > 1e-4
    again = np.stack([released(spec.apply(faces(1)[0], fresh_rng())) for _ in range(3)])
    assert len({tuple(row) for row in np.concatenate([masks[:3], again])}) == 6  # nothing repeats


def test_an_sdk_payload_passes_the_servers_checks_and_tampering_does_not():
    spec = subset_spec()
    payload = encode_features(spec.apply(faces(1)[0], fresh_rng()), spec)
    assert payload["epsilon"] == spec.epsilon_per_image and payload["transform_id"].endswith("-r33")
    features = decode_features(payload)
    FC.validate_features(features, spec)
    full = T.apply(faces(1)[0], T.spec_low(8), fresh_rng())
    too_many = np.where(released(features)[:, None, None], features, full)  # the SDK sent every channel
    too_few = features.copy()
    too_few[np.argmax(released(features))] = 0  # a noisy spec cannot release an all-zero channel
    for tampered, count in ((too_many, K), (too_few, N - 1)):
        with pytest.raises(FC.FeatureValidationError, match=f"{count} channels carry values") as caught:
            FC.validate_features(tampered, spec)
        assert caught.value.code == "channels"


def test_without_noise_a_released_channel_may_be_all_zeros():
    spec = subset_spec(epsilon=None)
    features = T.apply(np.full((112, 112, 3), 128, np.uint8), spec, fresh_rng())  # flat grey: every AC is 0
    assert not released(features).any()
    FC.validate_features(features, spec)
