"""Random channel subsets (PartialFace-style, issue 10): a spec that releases N of its K channels per image.

What must hold: the subset is fresh per image and uniform, drawn from os.urandom in the SDK; the released channels
are exactly the full spec's; the per-image ε counts only released coefficients; older specs keep their hashes; the
server refuses an upload that carries more (or, with noise, fewer) channels than the spec releases.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from typing import Any

import numpy as np
import pytest
from scipy import stats

from app.schemas import FeaturePayload
from app.services.features import decode_features as decode_payload
from client import subset_key
from client.environment import SUBSET_KEY_ENV
from client.errors import SubsetKeyError
from client.features import decode_features, encode_features, fresh_rng
from client.sdk import PrivfaceClient
from inference import feature_checks as FC
from inference import transform as T
from common.problems import Problem
from inference.transform import SUBSET_KEY_BYTES
from tests.test_client_detect import FACES

K = T.spec_low(8).num_channels  # 66
N = 33
PHOTO, OTHER_PHOTO = FACES / "James_Caan_0001.jpg", FACES / "Bill_Maher_0001.jpg"


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


def test_the_gateway_refuses_a_payload_with_too_many_channels_with_a_422():
    spec = subset_spec()
    good = encode_features(spec.apply(faces(1)[0], fresh_rng()), spec)
    decoded = decode_payload(FeaturePayload(**good), spec, quality_gate=False)
    assert (released(decoded) == released(decode_features(good))).all()
    whole = T.apply(faces(1)[0], T.spec_low(8), fresh_rng())
    tampered = {**good, "data": encode_features(whole, spec)["data"]}  # every channel, under the subset's name
    with pytest.raises(Problem) as caught:
        decode_payload(FeaturePayload(**tampered), spec, quality_gate=False)
    assert caught.value.status == 422 and caught.value.slug == "invalid-channels"
    assert f"{K} channels carry values" in caught.value.detail


def test_without_noise_a_released_channel_may_be_all_zeros_but_more_than_n_are_refused():
    spec = subset_spec(epsilon=None)
    features = T.apply(np.full((112, 112, 3), 128, np.uint8), spec, fresh_rng())  # flat grey: every AC is 0
    assert not released(features).any()
    FC.validate_features(features, spec)
    whole = T.clean(faces(1)[0], spec)  # every channel of a random face carries values
    with pytest.raises(FC.FeatureValidationError, match=f"{K} channels carry values") as caught:
        FC.validate_features(whole, spec)
    assert caught.value.code == "channels"
    FC.validate_features(T.apply(faces(1)[0], spec, fresh_rng()), spec)


def test_a_spec_is_never_both_allocated_and_random_subset():
    with pytest.raises(ValueError, match="either allocated or random-subset"):
        dataclasses.replace(subset_spec(), epsilon_weights=tuple([1.0] * K))
    for bad in (0, K):
        with pytest.raises(ValueError, match=f"random_channels must be in 1..{K - 1}"):
            subset_spec(keep=bad)


# --- the SDK pins the subset to a device key: re-sent photos and several photos of one person add no channels -------

def test_a_device_key_pins_the_subset_and_keys_from_the_os_spread_it_uniformly():
    spec = subset_spec()
    key = os.urandom(SUBSET_KEY_BYTES)
    pinned = T.PinnedSubsetNoise(key)
    first, second = spec.apply(faces(2), pinned), spec.apply(faces(1, seed=1)[0], T.PinnedSubsetNoise(key))
    assert (released(first) == released(second)).all() and released(second).sum() == N  # same channels, any photo
    again = spec.apply(faces(1)[0], pinned)
    assert not np.array_equal(again, first[0])  # the noise is still fresh from the OS
    masks = np.stack([released(spec.apply(faces(1)[0], T.PinnedSubsetNoise(os.urandom(32)))) for _ in range(300)])
    counts = masks.sum(axis=0)  # over devices, each channel is released with probability N/K
    assert (masks.sum(axis=1) == N).all() and len({tuple(row) for row in masks}) == 300
    assert stats.chisquare(counts, np.full(K, counts.sum() / K)).pvalue > 1e-4
    assert "key" in repr(pinned) and key.hex() not in repr(pinned)
    with pytest.raises(ValueError, match="32 bytes, not 16"):
        T.PinnedSubsetNoise(bytes(16))
    words = [set(pinned.random((count,)).tolist()) for count in (33, 40, 66)]  # disjoint keystreams per count
    assert all(not a & b for i, a in enumerate(words) for b in words[i + 1:])


def test_the_key_file_is_created_once_private_and_refused_when_damaged(tmp_path):
    path = tmp_path / "conf" / "subset.key"
    key = subset_key.load_or_create(path)
    assert len(key) == SUBSET_KEY_BYTES and subset_key.load_or_create(path) == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.chmod(0o644)
    with pytest.raises(SubsetKeyError, match="must belong to this user with mode 0600 \\(it is 644"):
        subset_key.load_or_create(path)
    path.chmod(0o600)
    path.write_bytes(b"short")
    with pytest.raises(SubsetKeyError, match="holds 5 bytes, not 32"):
        subset_key.load_or_create(path)
    assert not [p for p in path.parent.iterdir() if p.name != "subset.key"]  # no staging file left behind
    cases: list[tuple[Any, str]] = [(bytes(16), "16 bytes"), ("k" * 32, "str")]  # an app passing a wrong key
    for bad, size in cases:
        with pytest.raises(SubsetKeyError, match=f"a subset key is 32 bytes, not {size}"):
            PrivfaceClient("http://127.0.0.1:9", "unused", subset_key=bad)
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(SubsetKeyError, match="cannot create the subset key .*file/subset.key"):
        subset_key.load_or_create(blocked / "subset.key")  # its folder is a file


@pytest.mark.skipif(not PHOTO.exists(), reason=f"LFW photos absent under {PHOTO.parent}")
def test_the_sdk_sends_every_photo_with_the_devices_channels(tmp_path, monkeypatch):
    monkeypatch.setenv(SUBSET_KEY_ENV, str(tmp_path / "subset.key"))
    spec = subset_spec()
    with PrivfaceClient("http://127.0.0.1:9", "unused", transform=spec) as sdk:  # features() sends nothing
        payloads = [sdk.features(photo) for photo in (PHOTO, PHOTO, OTHER_PHOTO)]
    masks = [released(decode_features(p)) for p in payloads]
    assert all((m == masks[0]).all() for m in masks) and masks[0].sum() == N
    assert (tmp_path / "subset.key").stat().st_size == SUBSET_KEY_BYTES
    with PrivfaceClient("http://127.0.0.1:9", "unused", transform=spec, subset_key=os.urandom(32)) as other:
        assert not (released(decode_features(other.features(PHOTO))) == masks[0]).all()  # another device
