"""The feature quality gate (inference/quality_gate.py, app/services/features.py, docs/quality_gate.md): for every
transform preset at the served ε, real faces pass and the issue's non-face inputs (zeros, constants, the transform
of flat and noise frames) are refused; the gateway's decode step turns a refusal into a 422 unless switched off.

The end-to-end test (a real stack: 422 and nothing written) is in tests/test_gateway_api.py."""
from __future__ import annotations

import base64
import json
import secrets
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from app.problems import Problem
from app.schemas import FeaturePayload
from app.services.features import NO_FACE_SLUG, check_face, decode_features
from app.settings import GatewaySettings
from inference.lfw import load_rgb, lfw_dir, read_pairs
from inference.quality_gate import FEATURE_NAMES, face_evidence, gate_for, load_gates, noise_variance
from inference.transform import FACE_SIZE, PRESETS, TransformSpec, apply
from training_jobs import quality_gate as fit

SERVED_EPSILON = 64.0
SPECS = {name: make(SERVED_EPSILON) for name, make in PRESETS.items()}
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "faces"
FIXTURE_FACES = ("James_Caan_0001.jpg", "Bill_Maher_0001.jpg", "Mary_Jo_Myers_0001.jpg",
                 "Anders_Fogh_Rasmussen_0001.jpg")


def flat(level: int) -> np.ndarray:
    return np.full((FACE_SIZE, FACE_SIZE, 3), level, np.uint8)


def non_faces(spec: TransformSpec) -> dict[str, np.ndarray]:
    """One of each kind the issue listed, as the gateway would receive it (float16 features)."""
    rng = np.random.default_rng(123)
    noise = rng.integers(0, 256, (FACE_SIZE, FACE_SIZE, 3)).astype(np.uint8)
    gaussian = np.clip(128 + 30 * rng.normal(size=(FACE_SIZE, FACE_SIZE, 3)), 0, 255).astype(np.uint8)
    return {"zeros": np.zeros(spec.shape, np.float16), "constant 0.5": np.full(spec.shape, 0.5, np.float16),
            "constant -3": np.full(spec.shape, -3.0, np.float16), "black": apply(flat(0), spec, rng),
            "grey": apply(flat(128), spec, rng), "white": apply(flat(255), spec, rng),
            "uniform noise": apply(noise, spec, rng), "gaussian noise": apply(gaussian, spec, rng)}


def held_out_faces(shared, count: int = 12) -> list[np.ndarray]:
    """The first image of the first identities of LFW folds 6-10 (never used to fit the gate)."""
    lfw = lfw_dir(shared)
    names = sorted({p.split("/")[0] for pair in read_pairs(lfw) if pair.fold >= 6 for p in (pair.left, pair.right)})
    return [load_rgb(lfw, f"{name}/{name}_0001.jpg") for name in names[:count]]


def feature_payload(features: np.ndarray, spec: TransformSpec) -> FeaturePayload:
    return FeaturePayload(transform_id=spec.transform_id, params_hash=spec.params_hash, shape=list(spec.shape),
                          dtype="float16", data=base64.b64encode(features.astype("<f2").tobytes()).decode(),
                          epsilon=spec.epsilon_per_image, nonce=secrets.token_hex(16),
                          created_at=datetime.now(timezone.utc).isoformat())


def test_every_bundled_model_version_is_served_with_a_gate():
    """A version whose transform has no fitted gate would be served ungated (the gateway only logs a warning):
    v2-balanced's first end-to-end run was, before its gate was fitted."""
    from inference.metadata import ModelMetadata
    bundled = sorted(p for p in (Path(__file__).resolve().parents[1] / "inference" / "bundled").iterdir()
                     if (p / "model.json").is_file())
    assert len(bundled) >= 3
    assert [p.name for p in bundled if gate_for(ModelMetadata.load(p, verify=False).spec) is None] == []


# --- the committed gates ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_preset_has_a_gate_at_the_served_epsilon(name):
    gate = gate_for(SPECS[name])
    assert gate is not None, f"no gate for {name}: python -m training_jobs.quality_gate fit"
    assert gate.weights.shape == gate.mean.shape == (len(FEATURE_NAMES),)
    assert gate.layout_reference.shape == (196,)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_non_faces_of_the_issue_are_refused(name):
    spec = SPECS[name]
    gate = gate_for(spec)
    passed = [kind for kind, features in non_faces(spec).items() if gate.is_face(features, spec)]
    assert passed == [], f"{name}: non-faces taken for faces: {passed}"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_the_issues_83_inputs_are_all_refused(name):
    """The 83 inputs of issue 10 (zeros, 10 constants, 32 flat frames black to white, 20 + 20 noise images)."""
    spec = SPECS[name]
    inputs = fit.issue_inputs(np.random.default_rng(83), spec)
    assert len(inputs) == 83
    scores = gate_for(spec).logit(inputs, spec)
    assert (scores < gate_for(spec).threshold).all(), f"{name}: {int((scores >= gate_for(spec).threshold).sum())} pass"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_held_out_faces_pass(name, shared):
    spec = SPECS[name]
    gate = gate_for(spec)
    rng = np.random.default_rng(7)
    faces = np.stack(held_out_faces(shared))
    for _ in range(2):  # two noise draws each
        scores = gate.logit(apply(faces, spec, rng), spec)
        assert (scores >= gate.threshold).all(), f"{name}: faces refused, scores {np.round(scores, 1)}"


def test_faces_aligned_by_the_sdk_pass():
    """The real upload path: raw photos (tests/fixtures/faces), YuNet + alignment in the SDK, the served transform."""
    from client.features import aligned_face

    for name, spec in SPECS.items():
        gate = gate_for(spec)
        for photo in FIXTURE_FACES:
            features = apply(aligned_face(FIXTURES / photo), spec, np.random.default_rng(1))
            assert gate.is_face(features, spec), (name, photo, float(gate.logit(features, spec)))


def test_the_gate_reads_each_array_on_its_own():
    """A batch gives the same scores as one array at a time (the gateway scores one payload)."""
    spec = SPECS["dct8-v0"]
    gate = gate_for(spec)
    batch = np.stack(list(non_faces(spec).values()))
    one_by_one = [float(gate.logit(f, spec)) for f in batch]
    assert np.allclose(gate.logit(batch, spec), one_by_one)
    assert face_evidence(batch, spec, gate.layout_reference).shape == (len(batch), len(FEATURE_NAMES))


@pytest.mark.parametrize("name", sorted(SPECS))
def test_an_empty_frame_sits_at_the_transforms_noise_floor(name):
    """What the band features measure: the features of a flat frame hold only the SDK's noise, whose variance the
    spec fixes (2 (2 clip / ε)^2 of the face variance for Laplace: log -3.47 at ε 64)."""
    spec = SPECS[name]
    features = apply(np.repeat(flat(128)[None], 20, axis=0), spec, np.random.default_rng(5))
    bands = face_evidence(features, spec, gate_for(spec).layout_reference)[:, :8]
    assert np.log(noise_variance(spec)) == pytest.approx(np.log(2 * (2 * 4 / 64) ** 2))
    assert np.allclose(bands, np.log(noise_variance(spec)), atol=0.25)


# --- the gateway's decode step ---------------------------------------------------------------------------------

def test_decode_refuses_a_non_face_with_a_clear_422():
    spec = SPECS["dct8-v0"]
    with pytest.raises(Problem) as caught:
        decode_features(feature_payload(apply(flat(128), spec, np.random.default_rng(0)), spec), spec)
    problem = caught.value
    assert (problem.status, problem.slug) == (422, NO_FACE_SLUG)
    assert "no face" in problem.detail and "aligned face" in problem.detail


def test_decode_accepts_a_face_and_the_gate_can_be_switched_off(shared):
    spec = SPECS["dct8-v0"]
    face = apply(held_out_faces(shared, 1)[0], spec, np.random.default_rng(0))
    assert decode_features(feature_payload(face, spec), spec).shape == spec.shape
    zeros = np.zeros(spec.shape, np.float16)
    assert not decode_features(feature_payload(zeros, spec), spec, quality_gate=False).any()


def test_the_setting_turns_the_gate_off(monkeypatch):
    assert GatewaySettings().quality_gate is True
    monkeypatch.setenv("PRIVFACE_QUALITY_GATE", "false")
    assert GatewaySettings().quality_gate is False


def test_a_transform_without_a_fitted_gate_is_served_ungated():
    """The gate is keyed by params_hash: features of another noise level are never judged by a gate fitted for
    other statistics (documented: the gateway logs that the transform is ungated)."""
    spec = SPECS["dct8-v0"].with_epsilon(63.0)
    assert gate_for(spec) is None
    check_face(np.zeros(spec.shape, np.float32), spec)  # no gate: no refusal


def test_the_gate_file_refuses_gates_fitted_on_other_features(tmp_path):
    record = {"gates": {"x": {**gate_for(SPECS["dct8-v0"]).to_dict(), "features": ["something_else"]}}}
    path = tmp_path / "gates.json"
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="other features"):
        load_gates(path)


# --- the fit's pieces ------------------------------------------------------------------------------------------

def test_logistic_fit_separates_and_threshold_keeps_calibration_faces():
    rng = np.random.default_rng(0)
    x = np.vstack([rng.normal(2, 1, (300, 2)), rng.normal(-2, 1, (300, 2))])
    y = np.r_[np.ones(300), np.zeros(300)]
    weights, bias = fit.fit_logistic(x, y, np.ones(600))
    assert np.mean(((x @ weights + bias) > 0) == (y == 1)) > 0.97
    faces = [np.linspace(1.0, 10.0, 1000), np.linspace(0.5, 8.0, 1000)]
    assert fit.threshold_from(faces, np.array([-3.0, 0.9])) == pytest.approx(np.quantile(faces[1], 0.001))
    assert fit.threshold_from(faces, np.array([-3.0, -1.5])) == pytest.approx(-0.5)  # the gap's middle is lower


def test_only_fits_the_named_presets_and_refuses_a_name_that_is_none() -> None:
    """`fit --only dct8-low8` added one gate and left the others' as they were (2026-12-06); a misspelt or
    screening-only transform is refused in one line before any data is loaded."""
    assert list(fit.chosen(["dct8-low8"])) == ["dct8-low8"]
    assert list(fit.chosen(None)) == list(PRESETS)
    with pytest.raises(SystemExit, match="--only names no preset of inference.transform.PRESETS: dct8-low6"):
        fit.chosen(["dct8-low6"])
