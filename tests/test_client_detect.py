"""Client detection and alignment on real LFW photos (fixtures here; the fold-1 raw set when present)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from client.align import ARCFACE_TEMPLATE, align_face, similarity_matrix
from client.detect import FaceDetector, select_face, yunet_model_path
from client.errors import MultipleFacesError, NoFaceError
from client.features import aligned_face, load_photo
from tests.conftest import ROOT

FACES = ROOT / "tests" / "fixtures" / "faces"
FIXTURES = sorted(FACES.glob("*.jpg"))


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector()


def side_by_side(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Two photos next to each other on one canvas (heights padded with black)."""
    height = max(left.shape[0], right.shape[0])
    pad = [np.pad(img, ((0, height - img.shape[0]), (0, 0), (0, 0))) for img in (left, right)]
    return np.concatenate(pad, axis=1)


def test_fixtures_are_present() -> None:
    assert len(FIXTURES) == 5, f"expected 5 fixture photos in {FACES}"


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_one_face_with_plausible_landmarks(detector: FaceDetector, path: Path) -> None:
    faces = detector.detect(load_photo(path))
    assert len(faces) == 1
    face = faces[0]
    x, y, w, h = face.box
    assert face.score > 0.9 and 40 < w < 250 and 40 < h < 250
    inside = (face.landmarks >= [x, y]) & (face.landmarks <= [x + w, y + h])
    assert inside.all(), "landmarks must lie inside the face box"
    right_eye, left_eye, nose, right_mouth, left_mouth = face.landmarks
    assert right_eye[0] < nose[0] < left_eye[0] and right_mouth[0] < left_mouth[0]
    assert max(right_eye[1], left_eye[1]) < nose[1] < min(right_mouth[1], left_mouth[1])


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_alignment_puts_landmarks_on_the_template(detector: FaceDetector, path: Path) -> None:
    image = load_photo(path)
    face = select_face(detector.detect(image))
    matrix = similarity_matrix(face.landmarks)
    moved = face.landmarks @ matrix[:, :2].T + matrix[:, 2]
    assert np.abs(moved - ARCFACE_TEMPLATE).mean() < 3.0, "landmarks should land within a few pixels"
    crop = align_face(image, face.landmarks)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    assert crop[40:100, 30:82].std() > 10, "the face region of the crop holds image content"


def test_photo_without_a_face_raises(detector: FaceDetector) -> None:
    grid = np.indices((240, 320)).sum(axis=0) % 64 * 4
    blank = np.stack([grid, np.full_like(grid, 90), 255 - grid], axis=-1).astype(np.uint8)
    assert detector.detect(blank) == []
    with pytest.raises(NoFaceError):
        aligned_face(blank, detector=detector)


def test_two_faces_refused_unless_largest_is_asked_for(detector: FaceDetector) -> None:
    small = load_photo(FACES / "James_Caan_0001.jpg")
    large = cv2.resize(load_photo(FACES / "Bill_Maher_0001.jpg"), None, fx=1.5, fy=1.5)
    photo = side_by_side(small, large)
    faces = detector.detect(photo)
    assert len(faces) == 2
    with pytest.raises(MultipleFacesError) as caught:
        select_face(faces, "single")
    assert caught.value.count == 2
    chosen = select_face(faces, "largest")
    assert chosen.box[0] > small.shape[1], "the larger face is in the right-hand (upscaled) photo"
    with pytest.raises(MultipleFacesError):
        aligned_face(photo, "single", detector=detector)
    alone = select_face(detector.detect(large)).landmarks + [small.shape[1], 0]
    eye_distance = np.linalg.norm(alone[1] - alone[0])
    assert np.linalg.norm(chosen.landmarks - alone, axis=1).max() < 0.3 * eye_distance
    assert aligned_face(photo, "largest", detector).shape == (112, 112, 3)


def test_default_policy_takes_a_clearly_dominant_face_and_refuses_comparable_ones(detector: FaceDetector) -> None:
    """The default ("dominant") ignores a smaller bystander, as in a third of LFW's photo pairs, but does
    not guess between two faces of about the same size."""
    subject = cv2.resize(load_photo(FACES / "Bill_Maher_0001.jpg"), None, fx=1.6, fy=1.6)
    bystander = load_photo(FACES / "James_Caan_0001.jpg")
    photo = side_by_side(bystander, subject)
    faces = detector.detect(photo)
    assert len(faces) == 2
    assert select_face(faces).box[0] > bystander.shape[1], "the subject (right-hand, larger) is chosen"
    assert aligned_face(photo, detector=detector).shape == (112, 112, 3)
    peers = side_by_side(bystander, load_photo(FACES / "Mary_Jo_Myers_0001.jpg"))
    with pytest.raises(MultipleFacesError, match="none clearly the largest") as caught:
        aligned_face(peers, detector=detector)
    assert caught.value.count == 2


def test_unknown_face_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="face_policy"):
        unknown: Any = "first"  # not a FacePolicy: what an untyped caller may pass
        select_face([], unknown)


def test_model_path_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = yunet_model_path()
    assert real.is_file() and real.name == "face_detection_yunet_2023mar_int8bq.onnx"
    monkeypatch.setenv("PRIVFACE_YUNET_PATH", str(tmp_path / "missing.onnx"))
    with pytest.raises(FileNotFoundError, match="PRIVFACE_YUNET_PATH"):
        FaceDetector()
    copy = tmp_path / "yunet.onnx"
    copy.write_bytes(real.read_bytes())
    monkeypatch.setenv("PRIVFACE_YUNET_PATH", str(copy))
    assert yunet_model_path() == copy
    assert len(FaceDetector().detect(load_photo(FIXTURES[0]))) == 1


def test_large_photos_are_detected_in_original_coordinates(detector: FaceDetector) -> None:
    image = load_photo(FACES / "Mary_Jo_Myers_0001.jpg")
    big = cv2.resize(image, None, fx=6, fy=6, interpolation=cv2.INTER_CUBIC)  # 1500 px: shrunk for detection
    small_face, big_face = select_face(detector.detect(image)), select_face(detector.detect(big))
    eye_distance = np.linalg.norm(small_face.landmarks[1] - small_face.landmarks[0])
    # YuNet (int8) landmarks jitter by up to ~20% of the eye distance across scales; a missed rescale
    # would be off by several hundred percent.
    error = np.linalg.norm(big_face.landmarks / 6 - small_face.landmarks, axis=1).max()
    assert error < 0.3 * eye_distance


# ---- the fold-1 raw photos and their reference crops in the shared data (skipped when absent) ----------

def test_alignment_matches_the_reference_crops(shared: Path, detector: FaceDetector) -> None:
    """The SDK's crop of a raw photo is the crop the backbone was trained on (lfw-aligned-112)."""
    raw_dir = shared / "datasets" / "lfw-raw-fold1"
    aligned_dir = shared / "datasets" / "lfw-aligned-112"
    if not raw_dir.is_dir() or not aligned_dir.is_dir():
        pytest.skip(f"lfw-raw-fold1 or lfw-aligned-112 not found under {shared / 'datasets'}")
    diffs = []
    for path in sorted(raw_dir.glob("*/*.jpg"))[:40]:
        image = load_photo(path)
        faces = detector.detect(image)
        assert faces, f"YuNet finds a face in every LFW photo, not in {path.name}"
        if len(faces) > 1:
            continue  # the reference kept the face closest to the centre; the SDK would refuse this photo
        reference = load_photo(aligned_dir / path.parent.name / path.name)
        crop = align_face(image, faces[0].landmarks)
        diffs.append(np.abs(crop.astype(int) - reference.astype(int)).mean())
    assert len(diffs) >= 25
    assert np.mean(diffs) < 3.0 and max(diffs) < 8.0, f"mean abs pixel diffs: {np.round(diffs, 2)}"
