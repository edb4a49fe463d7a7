"""Client feature payloads: photo -> aligned face -> served transform with fresh noise -> JSON payload."""
from __future__ import annotations

import base64
import re
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import pytest

from client.detect import FaceDetector
from client.errors import InvalidPhotoError, NoFaceError, PrivfaceError
from client.features import (aligned_face, decode_features, encode_features, extract_features, load_photo,
                             with_fresh_nonce)
from inference.transform import default_spec
from tests.test_client_detect import FACES

PHOTO = FACES / "James_Caan_0001.jpg"
PAYLOAD_KEYS = {"transform_id", "params_hash", "shape", "dtype", "data", "epsilon", "nonce", "created_at"}


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector()


def test_photo_sources_agree() -> None:
    from_path = load_photo(PHOTO)
    assert from_path.shape == (250, 250, 3) and from_path.dtype == np.uint8
    np.testing.assert_array_equal(load_photo(str(PHOTO)), from_path)
    np.testing.assert_array_equal(load_photo(PHOTO.read_bytes()), from_path)
    np.testing.assert_array_equal(load_photo(from_path), from_path)
    rgba = np.concatenate([from_path, np.full((250, 250, 1), 255, np.uint8)], axis=2)
    np.testing.assert_array_equal(load_photo(rgba), from_path)
    assert load_photo(from_path[:, :, 0]).shape == (250, 250, 3)


@pytest.mark.parametrize("bad", [b"not an image", np.zeros((10, 10, 3), np.float32), np.zeros((4, 4, 2), np.uint8)])
def test_unusable_photos_are_refused(bad: Any) -> None:  # deliberately not a Photo
    """The SDK's own error class (client/errors.py), still a ValueError for callers that caught that."""
    with pytest.raises(InvalidPhotoError) as caught:
        load_photo(bad)
    assert isinstance(caught.value, PrivfaceError) and isinstance(caught.value, ValueError)


def test_payload_round_trip_is_exact() -> None:
    spec = default_spec()
    rng = np.random.default_rng(7)
    features = (rng.standard_normal(spec.shape) * 300).astype(np.float16)
    features[0, 0, :3] = [np.float16(65504), np.float16(-0.0), np.float16(6e-8)]  # extremes survive too
    payload = encode_features(features, spec)
    assert base64.b64decode(payload["data"]) == features.astype("<f2").tobytes()
    decoded = decode_features(payload)
    assert decoded.dtype == np.float16 and decoded.shape == spec.shape
    np.testing.assert_array_equal(decoded.view(np.uint16), features.view(np.uint16))


def test_payload_fields(detector: FaceDetector) -> None:
    spec = default_spec()
    payload = extract_features(PHOTO, spec, detector=detector)
    assert set(payload) == PAYLOAD_KEYS
    assert (payload["transform_id"], payload["params_hash"]) == (spec.transform_id, spec.params_hash)
    assert payload["shape"] == list(spec.shape) and payload["dtype"] == "float16"
    assert payload["epsilon"] == spec.epsilon_per_image
    assert re.fullmatch(r"[0-9a-f]{32}", payload["nonce"])
    created = datetime.fromisoformat(payload["created_at"].replace("Z", "+00:00"))
    assert created.tzinfo is not None and abs(datetime.now(timezone.utc) - created) < timedelta(minutes=1)


def test_features_are_the_transform_of_the_aligned_face(detector: FaceDetector) -> None:
    clean_spec = default_spec().with_epsilon(None)
    payload = extract_features(PHOTO, clean_spec, detector=detector)
    assert payload["epsilon"] is None, "no noise: no privacy claim (null, as the gateway expects)"
    expected = clean_spec.clean(aligned_face(PHOTO, detector=detector))
    np.testing.assert_array_equal(decode_features(payload), expected)


def test_every_payload_has_fresh_noise_and_nonce(detector: FaceDetector) -> None:
    spec = default_spec()
    first, second = (extract_features(PHOTO, spec, detector=detector) for _ in range(2))
    assert first["nonce"] != second["nonce"]
    a, b = decode_features(first).astype(np.float32), decode_features(second).astype(np.float32)
    assert np.mean(a != b) > 0.9, "noise must be drawn anew for every payload"
    clean = spec.clean(aligned_face(PHOTO, detector=detector)).astype(np.float32)
    noise = a - clean
    expected_std = np.sqrt(2) * spec.noise_scales()  # Laplace(b) has std sqrt(2) b
    measured_std = noise.reshape(spec.num_channels, -1).std(axis=1)
    assert np.allclose(measured_std.mean() / expected_std.mean(), 1.0, atol=0.1)


def test_fresh_nonce_keeps_the_features() -> None:
    spec = default_spec()
    payload = encode_features(np.zeros(spec.shape, np.float16), spec)
    again = with_fresh_nonce(payload)
    assert again["nonce"] != payload["nonce"]
    assert {k: v for k, v in again.items() if k not in ("nonce", "created_at")} == \
        {k: v for k, v in payload.items() if k not in ("nonce", "created_at")}


def test_no_face_means_no_payload(detector: FaceDetector) -> None:
    with pytest.raises(NoFaceError):
        extract_features(np.full((200, 200, 3), 128, np.uint8), default_spec(), detector=detector)


def test_wrong_shape_is_refused() -> None:
    spec = default_spec()
    with pytest.raises(ValueError, match="shape"):
        encode_features(np.zeros((3, 14, 14), np.float16), spec)


def test_the_gateway_accepts_the_payload(detector: FaceDetector) -> None:
    """Contract check against the gateway's own schema and decoder (docs/internals.md)."""
    schemas = pytest.importorskip("app.schemas")
    gateway_features = pytest.importorskip("app.services.features")
    spec = default_spec()
    payload = extract_features(PHOTO, spec, detector=detector)
    model = schemas.FeaturePayload.model_validate(payload)
    gateway_features.check_epsilon(model, spec, None)
    replay = pytest.importorskip("app.services.replay")
    replay.check_freshness(model, window_s=600, skew_s=300)  # the SDK always stamps created_at, in UTC
    decoded = gateway_features.decode_features(model, spec)
    np.testing.assert_array_equal(decoded, decode_features(payload).astype(np.float32))
