"""Photo -> feature payload: the only place the SDK touches the raw image.

photo (path, encoded bytes or RGB array) -> detect -> align -> the served frequency transform with
fresh noise -> the JSON payload of docs/internals.md. Only the noised float16 features leave this
module, so the image itself never reaches the network layer.
"""
from __future__ import annotations

import base64
import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import TypedDict, Union

import cv2
import numpy as np

from client.align import align_face
from client.detect import DEFAULT_FACE_POLICY, FaceDetector, FacePolicy, select_face
from client.errors import InvalidPhotoError
from inference.transform import NoiseSource, OsNoise, TransformSpec

Photo = Union[str, Path, bytes, bytearray, np.ndarray]


class FeaturePayload(TypedDict):
    """The JSON body part `features` (docs/internals.md); epsilon is None when the transform adds no noise."""

    transform_id: str
    params_hash: str
    shape: list[int]
    dtype: str
    data: str
    epsilon: float | None
    nonce: str
    created_at: str


def load_photo(photo: Photo) -> np.ndarray:
    """Any supported photo as RGB uint8 [H, W, 3]. Arrays are taken as RGB (grey and RGBA are converted)."""
    if isinstance(photo, np.ndarray):
        return _as_rgb(photo)
    data = bytes(photo) if isinstance(photo, (bytes, bytearray)) else Path(photo).read_bytes()
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)  # applies EXIF orientation
    if bgr is None:
        raise InvalidPhotoError("the photo could not be decoded as an image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _as_rgb(array: np.ndarray) -> np.ndarray:
    if array.dtype != np.uint8:
        raise InvalidPhotoError(f"photo arrays must be uint8, got {array.dtype}")
    if array.ndim == 2:
        return cv2.cvtColor(array, cv2.COLOR_GRAY2RGB)
    if array.ndim == 3 and array.shape[2] == 4:
        return np.ascontiguousarray(array[:, :, :3])
    if array.ndim == 3 and array.shape[2] == 3:
        return np.ascontiguousarray(array)
    raise InvalidPhotoError(f"photo arrays must be [H, W], [H, W, 3] or [H, W, 4], got {array.shape}")


def aligned_face(photo: Photo, face_policy: FacePolicy = DEFAULT_FACE_POLICY, detector: FaceDetector | None = None) -> np.ndarray:
    """The chosen face, aligned: RGB uint8 [112, 112, 3]; raises NoFaceError / MultipleFacesError."""
    image = load_photo(photo)
    face = select_face((detector or FaceDetector()).detect(image), face_policy)
    return align_face(image, face.landmarks)


def extract_features(photo: Photo, spec: TransformSpec, face_policy: FacePolicy = DEFAULT_FACE_POLICY,
                     detector: FaceDetector | None = None, noise: NoiseSource | None = None) -> FeaturePayload:
    """The upload for one photo: aligned, transformed with fresh noise (from `noise`, default `fresh_rng()`: the
    SDK passes a `PinnedSubsetNoise` for a random-subset spec), encoded."""
    face = aligned_face(photo, face_policy, detector)
    return encode_features(spec.apply(face, noise or fresh_rng()), spec)


def fresh_rng() -> OsNoise:
    """Noise straight from the OS CSPRNG (``inference.transform.OsNoise``): never reused, never predictable."""
    return OsNoise()


def encode_features(features: np.ndarray, spec: TransformSpec) -> FeaturePayload:
    """Wrap float16 [K, 14, 14] features made with `spec` in a payload with a new nonce and timestamp."""
    if features.shape != spec.shape:
        raise ValueError(f"features shape {features.shape} does not match the transform's {spec.shape}")
    data = np.ascontiguousarray(features, dtype="<f2").tobytes()
    epsilon = spec.epsilon_per_image
    return FeaturePayload(
        transform_id=spec.transform_id, params_hash=spec.params_hash, shape=list(features.shape),
        dtype="float16", data=base64.b64encode(data).decode("ascii"),
        epsilon=epsilon if np.isfinite(epsilon) else None, nonce=secrets.token_hex(16), created_at=utc_now())


def decode_features(payload: FeaturePayload) -> np.ndarray:
    """The exact float16 array inside a payload (for checks and tests)."""
    if payload["dtype"] != "float16":
        raise ValueError(f"unsupported dtype {payload['dtype']!r}")
    array = np.frombuffer(base64.b64decode(payload["data"], validate=True), dtype="<f2")
    return array.reshape(payload["shape"]).astype(np.float16)


def with_fresh_nonce(payload: FeaturePayload) -> FeaturePayload:
    """The same features under a new nonce and timestamp.

    The gateway remembers every nonce it has seen, so a retried request needs a new one; resending the
    same noisy features costs no extra privacy, whereas re-noising the photo would spend ε again.
    """
    return FeaturePayload(**{**payload, "nonce": secrets.token_hex(16), "created_at": utc_now()})


def utc_now() -> str:
    """ISO 8601 UTC with a Z suffix, e.g. 2026-11-23T10:00:00.123456Z."""
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
