"""Sealed mode (issue 12): the SDK's sealed shares of real face features (LFW training identities, outside View-2
folds 6-10) open only at their party, add up to the features, look uniform alone, and never appear in the clear in
what the gateway relays."""
from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from client import sealed as client_sealed
from inference.lfw import images_outside_pairs, lfw_dir, load_many
from inference.transform import PRESETS, OsNoise, apply
from secure import sealed_box, sharing
from tests.test_sharing_uniform import uniformity_failures

SPEC = PRESETS["dct8-v0"](64.0)


@pytest.fixture(scope="module")
def faces_features() -> np.ndarray:
    lfw = lfw_dir()
    faces = load_many(lfw, images_outside_pairs(lfw)[:12])  # training identities only
    return apply(faces, SPEC, OsNoise()).astype(np.float32)


@pytest.fixture(scope="module")
def keys() -> dict[int, sealed_box.PartyKey]:
    return {0: sealed_box.PartyKey.generate(), 1: sealed_box.PartyKey.generate()}


def context(shape: tuple[int, ...], nonce: str = "n-1", operation: str = "verify",
            created_at: int = 1_796_000_000) -> dict[str, object]:
    return {"transform_id": SPEC.transform_id, "shape": list(shape), "nonce": nonce, "operation": operation,
            "created_at": created_at}


def seal(features: np.ndarray, keys: dict[int, sealed_box.PartyKey], ctx: dict[str, object]):
    return client_sealed.seal_features(features, {r: k.public_b64 for r, k in keys.items()}, ctx)


def test_each_party_opens_its_share_and_the_shares_add_up_to_the_features(faces_features, keys):
    one = faces_features[0]
    ctx = context(one.shape)
    envelopes = seal(one, keys, ctx)
    s0 = sealed_box.open_share(dict(envelopes[0]), 0, keys[0], ctx)
    s1 = sealed_box.open_share(dict(envelopes[1]), 1, keys[1], ctx)
    assert np.array_equal(sharing.reconstruct(s0, s1), client_sealed.encode_fixed(one))
    decoded = sharing.reconstruct(s0, s1).astype(np.float64) / 65536
    assert np.max(np.abs(decoded - one)) <= 2**-17 + 1e-12  # fixed-point rounding only


def test_the_client_and_the_party_bind_the_same_associated_data():
    ctx = context((3, 14, 14))
    assert client_sealed.associated_data(1, "abc", ctx) == sealed_box.associated_data(1, "abc", ctx)
    assert client_sealed.SCHEME == sealed_box.SCHEME


@pytest.mark.parametrize("change", ["other-party", "tampered", "other-request", "other-key", "swapped",
                                    "other-operation", "other-time"])
def test_an_envelope_opens_nowhere_else(faces_features, keys, change):
    one = faces_features[1]
    ctx = context(one.shape)
    envelopes = [dict(e) for e in seal(one, keys, ctx)]
    envelope, rank, key, open_ctx = envelopes[0], 0, keys[0], ctx
    if change == "other-party":
        rank, key = 1, keys[1]
    elif change == "tampered":
        raw = bytearray(base64.b64decode(envelope["ciphertext"]))
        raw[5] ^= 1
        envelope["ciphertext"] = base64.b64encode(bytes(raw)).decode()
    elif change == "other-request":
        open_ctx = context(one.shape, nonce="n-2")
    elif change == "other-key":
        key = sealed_box.PartyKey.generate()
    elif change == "other-operation":  # an enrollment resent as a probe
        open_ctx = context(one.shape, operation="enroll")
    elif change == "other-time":  # an old payload restamped to look fresh
        open_ctx = context(one.shape, created_at=1_796_000_001)
    else:  # the relay relabels party 1's envelope as party 0's
        envelope = {**envelopes[1], "party": 0, "key_id": keys[0].key_id}
    with pytest.raises(sealed_box.SealedError):
        sealed_box.open_share(envelope, rank, key, open_ctx)


def test_each_party_share_of_real_features_looks_uniform(faces_features, keys):
    opened: dict[int, list[np.ndarray]] = {0: [], 1: []}
    for i, features in enumerate(faces_features[:10]):  # 10 x 13,328 ring elements per party
        ctx = context(features.shape, nonce=f"n-{i}")
        for rank, envelope in enumerate(seal(features, keys, ctx)):
            opened[rank].append(sealed_box.open_share(dict(envelope), rank, keys[rank], ctx))
    assert uniformity_failures(client_sealed.encode_fixed(faces_features[:10])) != []  # the detector has teeth
    for rank in (0, 1):
        assert uniformity_failures(np.stack(opened[rank])) == []


def test_the_relayed_envelopes_hold_no_feature_or_share_bytes(faces_features, keys):
    """What the gateway relays in sealed mode: ciphertext. Neither the features (float16/float32/fixed point) nor
    either share appears in it, raw or base64."""
    one = faces_features[2]
    ctx = context(one.shape)
    envelopes = seal(one, keys, ctx)
    relayed = json.dumps(envelopes).encode()
    shares = [sealed_box.open_share(dict(e), r, keys[r], ctx) for r, e in enumerate(envelopes)]
    for secret in (one.astype(np.float16).tobytes(), one.tobytes(), client_sealed.encode_fixed(one).tobytes(),
                   *(s.tobytes() for s in shares)):
        for probe in (secret[:32], secret[4000:4032]):
            assert probe not in relayed
            assert base64.b64encode(probe)[:40] not in relayed
        assert base64.b64encode(secret)[:40] not in relayed


def test_bad_keys_and_shapes_are_refused_with_a_clear_error(faces_features, keys):
    with pytest.raises(ValueError, match="base64 of 32 bytes"):
        sealed_box.party_key_from_env({"PRIVFACE_PARTY_SEALED_KEY": "not-a-key"})
    with pytest.raises(ValueError, match="party 0 and party 1"):
        client_sealed.seal_features(faces_features[0], {0: keys[0].public_b64}, context(faces_features[0].shape))
    with pytest.raises(ValueError, match="shape"):
        seal(faces_features[0], keys, context((1, 2, 3)))
    restored = sealed_box.party_key_from_env({"PRIVFACE_PARTY_SEALED_KEY": keys[0].private_b64()})
    assert restored.public == keys[0].public
