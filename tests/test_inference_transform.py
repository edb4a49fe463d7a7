"""The frequency transform: exactness, channel layout, spec identity, noise calibration, validation."""

from __future__ import annotations

import dataclasses
import json
import math
import timeit

import numpy as np
import pytest
from scipy.fft import dctn

from inference import feature_checks as FC
from inference import transform as T
from inference.lfw import fold_pairs, lfw_dir, load_many

LFW = lfw_dir()
needs_lfw = pytest.mark.skipif(not (LFW / "pairs.txt").exists(), reason=f"aligned LFW not found at {LFW}")


def random_faces(n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 112, 112, 3), dtype=np.uint8)


def keep_everything(clip_sigmas: float = 1e6) -> T.TransformSpec:
    return T.make_spec("all", tuple(range(64)), tuple(range(64)), None, clip_sigmas=clip_sigmas)


@pytest.fixture(scope="module")
def faces() -> np.ndarray:
    if not (LFW / "pairs.txt").exists():
        pytest.skip(f"aligned LFW not found at {LFW}")
    return load_many(LFW, [p.left for p in fold_pairs(LFW, 1)[:6]])


def test_round_trip_is_exact_without_removal_or_noise():
    faces = random_faces()
    spec = keep_everything()
    assert np.array_equal(T.inverse(T.clipped(faces, spec), spec), faces)
    assert np.array_equal(T.inverse(T.clipped(faces[0], spec), spec), faces[0])


def test_block_dct_matches_scipy_orthonormal_dct2_in_raster_order():
    planes = np.random.default_rng(1).normal(size=(112, 112))
    coef = T.block_dct(planes)
    block = planes[16:24, 40:48]  # block row 2, column 5
    assert np.allclose(coef[:, 2, 5], dctn(block, norm="ortho").reshape(64))
    assert np.allclose(T.block_idct(coef), planes)


def test_feature_channels_follow_the_documented_order():
    face = random_faces(1)[0]
    spec = T.spec_v0(None)
    assert spec.shape == (73, 14, 14)
    full = T.full_coefficients(face)
    features = T.clipped(face, spec)
    bounds = spec.clip_bounds()
    assert np.allclose(features[0], np.clip(full[0, 1], -bounds[0], bounds[0]))  # Y, frequency 1
    assert np.allclose(features[62], np.clip(full[0, 63], -bounds[62], bounds[62]))  # Y, frequency 63
    assert np.allclose(features[63 + 3], np.clip(full[1, 9], -bounds[66], bounds[66]))  # Cb, frequency 9
    assert np.allclose(features[68 + 4], np.clip(full[2, 16], -bounds[72], bounds[72]))  # Cr, frequency 16


def test_removed_channels_rebuild_as_zero_coefficients():
    face = random_faces(1)[0]
    spec = T.spec_low10(None)
    rebuilt = T.inverse(T.clipped(face, keep_everything()), keep_everything())
    degraded = T.inverse(T.clean(face, spec), spec)
    assert np.array_equal(rebuilt, face) and not np.array_equal(degraded, face)
    assert spec.shape == (64, 14, 14) and not set(T.LOW10) & set(spec.luma_keep + spec.chroma_keep)


def test_clean_features_are_clipped_float16():
    faces = random_faces()
    spec = T.spec_v0(None)
    features = T.clean(faces, spec)
    assert features.dtype == np.float16 and features.shape == (3, 73, 14, 14)
    bounds = spec.clip_bounds()[:, None, None]
    assert np.all(np.abs(features.astype(np.float64)) <= bounds * (1 + 1e-3))
    assert np.any(np.isclose(np.abs(features.astype(np.float64)), bounds, rtol=1e-3))  # random pixels do clip


def test_spec_identity_and_serialisation():
    spec = T.spec_v0()
    assert spec.transform_id == f"dct8-y63c5-lap{T.DEFAULT_EPSILON_PER_COEFFICIENT:g}"
    assert len(spec.params_hash) == 16 and int(spec.params_hash, 16) >= 0
    again = T.TransformSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec and again.params_hash == spec.params_hash
    assert T.default_spec() == spec
    assert T.spec_v0(None).transform_id == "dct8-y63c5-clean"
    gaussian = dataclasses.replace(spec, mechanism="gaussian", epsilon_per_coefficient=0.5, delta=1e-9)
    assert gaussian.transform_id == "dct8-y63c5-gau0.5d1e-09"


@pytest.mark.parametrize("change", [
    {"name": "other"},
    {"luma_keep": tuple(range(2, 64)), "channel_std": T.spec_v0().channel_std[1:]},
    {"chroma_keep": (1, 2, 8, 9, 17)},
    {"clip_sigmas": 3.0},
    {"mechanism": "gaussian", "delta": 1e-6},
    {"epsilon_per_coefficient": T.DEFAULT_EPSILON_PER_COEFFICIENT / 2},
    {"epsilon_per_coefficient": None},
    {"channel_std": (T.spec_v0().channel_std[0] * 1.001,) + T.spec_v0().channel_std[1:]},
])
def test_params_hash_changes_with_every_parameter(change):
    spec = T.spec_v0()
    assert dataclasses.replace(spec, **change).params_hash != spec.params_hash


def test_invalid_specs_are_refused():
    spec = T.spec_v0()
    with pytest.raises(ValueError):
        dataclasses.replace(spec, luma_keep=(2, 1) + spec.luma_keep[2:])
    with pytest.raises(ValueError):
        dataclasses.replace(spec, channel_std=spec.channel_std[:-1])
    with pytest.raises(ValueError):
        dataclasses.replace(spec, mechanism="gaussian", delta=None)
    with pytest.raises(ValueError):
        dataclasses.replace(spec, epsilon_per_coefficient=-1.0)


def test_epsilon_is_reported_by_basic_composition():
    spec = T.spec_v0(2.0)
    assert spec.epsilon_per_image == 73 * 196 * 2.0 and spec.delta_per_image == 0.0
    assert math.isinf(T.spec_v0(None).epsilon_per_image)
    gaussian = dataclasses.replace(spec, mechanism="gaussian", delta=1e-8)
    assert gaussian.epsilon_per_image == 73 * 196 * 2.0
    assert gaussian.delta_per_image == pytest.approx(73 * 196 * 1e-8)


@needs_lfw
def test_laplace_noise_scale_matches_epsilon(faces):
    spec = T.spec_v0(64.0)  # b_c = 2 * 4 sigma_c / 64 = sigma_c / 8
    rng = np.random.default_rng(0)
    face = faces[0]
    draws = np.stack([T.apply(face, spec, rng) for _ in range(40)]).astype(np.float64)
    noise = draws - T.clipped(face, spec)
    measured = np.abs(noise).mean(axis=(0, 2, 3))  # E|Laplace(b)| = b, per channel
    ratio = measured / spec.noise_scales()
    assert np.allclose(spec.noise_scales(), spec.clip_bounds() * 2 / 64)
    assert abs(ratio.mean() - 1) < 0.01 and np.all(np.abs(ratio - 1) < 0.06)


def test_gaussian_noise_scale_matches_epsilon_and_delta():
    spec = dataclasses.replace(T.spec_v0(), mechanism="gaussian", epsilon_per_coefficient=0.9, delta=1e-6)
    expected = 2 * spec.clip_bounds() * math.sqrt(2 * math.log(1.25 / 1e-6)) / 0.9
    assert np.allclose(spec.noise_scales(), expected)
    rng = np.random.default_rng(1)  # float64 noise before the float16 cast: huge at this ε
    noise = T.add_noise(np.zeros((30, *spec.shape)), spec, rng)
    measured = noise.std(axis=(0, 2, 3))
    assert np.all(np.abs(measured / expected - 1) < 0.06)
    kurtosis = (noise ** 4).mean(axis=(0, 2, 3)) / (noise ** 2).mean(axis=(0, 2, 3)) ** 2
    assert np.all(np.abs(kurtosis - 3) < 0.5)  # Gaussian (Laplace would be 6)


def test_no_noise_when_epsilon_is_none():
    faces = random_faces(1)
    spec = T.spec_v0(None)
    rng = np.random.default_rng(0)
    assert np.array_equal(T.apply(faces, spec, rng), T.clean(faces, spec))
    assert not np.any(spec.noise_scales())


@needs_lfw
def test_validation_accepts_honest_features(faces):
    spec = T.spec_v0()
    rng = np.random.default_rng(2)
    for features in T.apply(faces, spec, rng):
        FC.validate_features(features, spec)
    FC.validate_features(T.clean(faces[0], spec.with_epsilon(None)), spec.with_epsilon(None))


@pytest.mark.parametrize("corrupt, code", [
    (lambda a: a.astype(np.float32), "dtype"),
    (lambda a: a[:-1], "shape"),
    (lambda a: a.reshape(1, *a.shape), "shape"),
    (lambda a: np.where(np.arange(a.size).reshape(a.shape) == 5, np.float16("nan"), a), "non-finite"),
    (lambda a: np.where(np.arange(a.size).reshape(a.shape) == 7, np.float16("inf"), a), "non-finite"),
    (lambda a: a * np.float16(60), "out-of-range"),
    (lambda a: np.full_like(a, 1e4), "out-of-range"),
    (lambda a: a.tolist(), "dtype"),
])
def test_validation_rejects_bad_features(corrupt, code):
    spec = T.spec_v0()
    good = T.apply(random_faces(1)[0], spec, np.random.default_rng(3))
    FC.validate_features(good, spec)
    with pytest.raises(FC.FeatureValidationError) as caught:
        FC.validate_features(corrupt(good), spec)
    assert caught.value.code == code and caught.value.detail


def test_validation_bound_is_tight_for_noise_free_transforms():
    spec = T.spec_v0(None)
    features = T.clean(random_faces(1)[0], spec)
    bumped = features.copy()
    bumped[0, 0, 0] = np.float16(spec.clip_bounds()[0] * 1.01)
    with pytest.raises(FC.FeatureValidationError):
        FC.validate_features(bumped, spec)


def test_transform_is_fast():
    """The SDK's transform costs about one full-image DCT plus a noise draw over the face (~1 ms here). Timed
    against that reference in the same process and moment, so a busy shared machine slows both (an absolute
    4 ms limit failed once at 4.17 ms inside the parallel suite): measured ratio 1.33, limit 4."""
    import cv2

    face = random_faces(1)[0]
    spec = T.spec_v0()
    rng = np.random.default_rng(0)

    def reference() -> np.ndarray:
        pixels = face.astype(np.float32)
        for channel in range(3):
            cv2.dct(np.ascontiguousarray(pixels[:, :, channel]))
        return np.clip(pixels, 0, 255) + rng.laplace(0.0, 1.0, size=pixels.shape)

    ratios = []
    for _ in range(3):  # interleaved: both sides see the same load
        per_face = min(timeit.repeat(lambda: T.apply(face, spec, rng), number=20, repeat=5)) / 20
        baseline = min(timeit.repeat(reference, number=20, repeat=5)) / 20
        ratios.append(per_face / baseline)
    assert min(ratios) < 4.0, f"transform / reference = {ratios} ({per_face * 1e3:.2f} ms per face)"


def test_sdk_noise_comes_from_the_os_and_has_the_right_law() -> None:
    """The SDK's noise (OsNoise, os.urandom) is Laplace / Gaussian with the requested scale (KS test), and two
    draws never repeat (a seeded numpy generator would be predictable from its output)."""
    from scipy import stats

    from client.features import fresh_rng
    from inference.transform import OsNoise

    noise = fresh_rng()
    assert isinstance(noise, OsNoise)
    lap = noise.laplace(0.0, np.full(20000, 2.0))
    gau = noise.normal(0.0, np.full(20000, 3.0))
    assert stats.kstest(lap, "laplace", args=(0, 2.0)).pvalue > 1e-4
    assert stats.kstest(gau, "norm", args=(0, 3.0)).pvalue > 1e-4
    assert not np.array_equal(noise.laplace(0.0, np.ones(64)), noise.laplace(0.0, np.ones(64)))
    assert np.isfinite(OsNoise.uniform((100000,))).all() and 0 < OsNoise.uniform((100000,)).min()


def test_frontier_presets_remove_the_lowest_zigzag_frequencies() -> None:
    from inference.transform import LOW10, LOW10_CHROMA_KEEP, PRESETS, SCREENED, ZIGZAG

    assert sorted(ZIGZAG) == list(range(64)) and set(ZIGZAG[:10]) == set(LOW10)
    assert tuple(sorted(ZIGZAG[10:15])) == LOW10_CHROMA_KEEP
    for removed in (3, 6, 8, 9, 10, 12, 15, 21):
        spec = {**PRESETS, **SCREENED}[f"dct8-low{removed}"]()
        assert spec.name == f"dct8-low{removed}"
        assert not set(spec.luma_keep) & set(ZIGZAG[:removed]) and len(spec.luma_keep) == 64 - removed
        assert set(spec.chroma_keep) == set(ZIGZAG[removed:removed + 5])  # sparse colour: the next five
    assert PRESETS["dct8-low8"](64.0).transform_id != SCREENED["dct8-low9"](64.0).transform_id
