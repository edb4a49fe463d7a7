"""Five-point alignment: a similarity warp of the detected landmarks onto the ArcFace 112x112 template.

The template and the estimator (cv2.estimateAffinePartial2D with LMEDS) are the ones used to build
$PRIVFACE_SHARED_DIR/datasets/lfw-aligned-112, on which the backbone was trained and evaluated, so the
SDK's crops match the model's training distribution.
"""
from __future__ import annotations

import cv2
import numpy as np

FACE_SIZE = 112
# Right eye, left eye, nose tip, right mouth corner, left mouth corner (x, y) in the 112x112 crop.
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)


def similarity_matrix(landmarks: np.ndarray) -> np.ndarray:
    """2x3 similarity transform (rotation, uniform scale, translation) taking landmarks onto the template."""
    points = np.asarray(landmarks, dtype=np.float32).reshape(5, 2)
    matrix, _ = cv2.estimateAffinePartial2D(points, ARCFACE_TEMPLATE, method=cv2.LMEDS)
    if matrix is None:
        raise ValueError("landmarks are degenerate; no similarity transform fits them")
    return matrix


def align_face(image_rgb: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """The aligned face: RGB uint8 [112, 112, 3]."""
    matrix = similarity_matrix(landmarks)
    return cv2.warpAffine(image_rgb, matrix, (FACE_SIZE, FACE_SIZE), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
