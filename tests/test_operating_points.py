"""Identify thresholds that hold the false-positive rate per search as the gallery grows (issue 9 / 10).

inference/operating_points.py calibrates a model's impostor curve on identities in no View-2 fold;
secure/thresholds.py turns it into the per-gallery-size schedule the parties apply.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from inference.operating_points import ImpostorCurve, calibration_images, per_comparison_fmr
from secure.thresholds import GalleryPolicy


def _impostors(n: int = 400_000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.05, 0.12, size=n)


def test_per_comparison_rate_holds_the_per_search_rate() -> None:
    for fpir in (0.01, 0.1):
        for n in (1, 10, 1000, 10**6):
            p = per_comparison_fmr(fpir, n)
            assert math.isclose(-math.expm1(n * math.log1p(-p)), fpir, rel_tol=1e-9)


def test_empirical_thresholds_match_the_quantiles() -> None:
    scores = _impostors()
    curve = ImpostorCurve.from_scores(scores)
    for fmr in (0.1, 0.01, 1e-3):
        t = curve.threshold(fmr)
        assert abs(float(np.mean(scores >= t)) - fmr) < 0.15 * fmr + 2 / scores.size


def test_tail_extrapolation_is_conservative_for_a_gaussian() -> None:
    """Beyond the data (fmr < 200 / pairs) the exponential tail; for a Gaussian impostor distribution it must not
    be looser than the truth at 1e-6 .. 1e-8 (the exponential tail is heavier than the Gaussian's)."""
    from statistics import NormalDist

    curve = ImpostorCurve.from_scores(_impostors())
    truth = NormalDist(0.05, 0.12)
    for fmr in (1e-6, 1e-7, 1e-8):
        assert curve.threshold(fmr) >= truth.inv_cdf(1 - fmr) - 0.01


def test_measured_fpir_holds_as_the_gallery_grows() -> None:
    """Simulated searches: an unenrolled probe's best of N impostor scores passes the schedule's threshold in
    about FPIR of the searches at every N, where one fixed threshold's rate climbs towards 1."""
    rng = np.random.default_rng(1)
    curve = ImpostorCurve.from_scores(_impostors(seed=2))
    policy = GalleryPolicy(0.2, tuple((int(n), float(t)) for n, t in curve.identify_schedule(0.05)))
    for n in (10, 100, 1000):
        best = rng.normal(0.05, 0.12, size=(2000, n)).max(axis=1)
        rate = float(np.mean(best >= policy.identify_threshold(n)))
        fixed = float(np.mean(best >= 0.2))
        assert rate < 0.05 * 1.6 + 0.01, (n, rate)
        assert fixed > 0.3  # the 1:1 threshold alone: most unenrolled probes match someone
    assert policy.identify_threshold(5) <= policy.identify_threshold(50) <= policy.identify_threshold(5000)


def test_schedule_never_drops_below_the_verify_threshold() -> None:
    curve = ImpostorCurve.from_scores(_impostors())
    schedule = curve.identify_schedule(0.99, floor=0.5)
    assert all(t >= 0.5 for _, t in schedule)


def test_policy_round_trip_and_validation() -> None:
    p = GalleryPolicy(0.3, ((10, 0.4), (1000, 0.6)))
    assert GalleryPolicy.from_json(p.verify, p.schedule_json()) == p
    assert p.threshold("verify", 10**6) == 0.3
    assert p.identify_threshold(1) == 0.4 and p.identify_threshold(11) == 0.6 and p.identify_threshold(10**7) == 0.6
    assert GalleryPolicy(0.3).identify_threshold(10**6) == 0.3
    for bad in (((10, 0.4), (10, 0.5)), ((0, 0.4),), ((10, 1.5),), ((10, float("nan")),)):
        with pytest.raises(ValueError):
            GalleryPolicy(0.3, bad)
    with pytest.raises(ValueError):
        GalleryPolicy(40.0)


def test_calibration_never_uses_a_held_out_identity(shared: Path) -> None:
    from inference.lfw import lfw_dir, read_pairs

    lfw = lfw_dir(shared)
    named = {path.split("/")[0] for p in read_pairs(lfw) for path in (p.left, p.right)}
    chosen = calibration_images(lfw, 500)
    assert len(chosen) == 500 and not {p.split("/")[0] for p in chosen} & named


def _face_folder(root: Path, people: int, photos: int, lfw: Path) -> Path:
    """A face folder laid out as LFW (person/person_NNNN.jpg), its photos hard-linked from real LFW faces."""
    from inference.lfw import images_outside_pairs

    sources = iter(images_outside_pairs(lfw))
    for k in range(people):
        folder = root / f"celeb_{k}"
        folder.mkdir(parents=True)
        for j in range(photos):
            (folder / f"celeb_{k}_{j:04d}.jpg").hardlink_to(lfw / next(sources))
    return root


def test_calibration_on_unseen_people_uses_every_person_of_their_folder(shared: Path, tmp_path: Path) -> None:
    from inference.lfw import lfw_dir
    from inference.operating_points import calibrate
    from inference.transform import spec_v0

    lfw = lfw_dir(shared)
    folder = _face_folder(tmp_path / "unseen", people=30, photos=5, lfw=lfw)
    chosen = calibration_images(folder, 1000, every_person=True)
    assert len(chosen) == 120 and len({p.split("/")[0] for p in chosen}) == 30  # 4 of each person's 5
    spec = spec_v0()
    curve = calibrate(lambda x: x.reshape(len(x), -1)[:, :64], spec, lfw, unseen=folder)
    assert "every person of unseen (none trained on): 120 images of 30 people" in curve.source
    small = _face_folder(tmp_path / "small", people=20, photos=3, lfw=lfw)  # 60 images: too few to calibrate on
    with pytest.raises(ValueError, match="60 calibration images, fewer than 100"):
        calibrate(lambda x: x.reshape(len(x), -1)[:, :64], spec, lfw, unseen=small)


def test_a_trained_model_exported_with_unseen_faces_is_calibrated_on_them(shared: Path, tmp_path: Path) -> None:
    """export_model_version(calibration_faces=...), what a training config's `export.calibration_faces` passes: the
    served threshold comes from the unseen people's impostor curve, and model.json says whose."""
    import torch

    from inference.export import export_model_version
    from inference.mobilefacenet import EMBEDDING_DIM
    from inference.lfw import lfw_dir
    from inference.metadata import ModelMetadata
    from inference.transform import spec_v0

    spec = spec_v0()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(spec.num_channels * 196, EMBEDDING_DIM))
    folder = _face_folder(tmp_path / "unseen", people=30, photos=5, lfw=lfw_dir(shared))
    final = export_model_version(model, spec, "v9-test", tmp_path / "models", shared, None, {},
                                 calibration_faces=folder)
    meta = ModelMetadata.load(final)
    curve = ImpostorCurve.from_dict(meta.impostor_curve)
    assert curve.source.startswith("every person of unseen (none trained on): 120 images of 30 people")
    assert meta.threshold == pytest.approx(curve.threshold(1e-3))
    assert meta.metrics["served_threshold"] == "false-match rate 0.001 on the calibration impostors"
