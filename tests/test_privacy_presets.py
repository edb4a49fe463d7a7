"""Privacy presets served side by side: one active model version per preset, a tenant's choice decides which
transform its SDK applies and which model serves it; the bundled trained models are installed at first start."""
from __future__ import annotations

import json
import shutil
from typing import get_args

import pytest
from sqlalchemy.orm import Session

from app.db import Base, make_engine, make_sessionmaker, session_scope
from app.models import ModelVersion
from app.problems import Problem
from app.schemas import PresetIn
from app.services.bundled_models import bundled_versions, install_bundled
from app.services.model_registry import ServedModels, activate_version, active_version, active_versions
from app.settings import GatewaySettings
from common.paths import PROJECT_ROOT
from inference.metadata import ModelMetadata
from inference.privacy_presets import PRIVACY_PRESETS, check_preset, preset_of_transform
from inference.transform import PRESETS

BUNDLED = PROJECT_ROOT / "inference" / "bundled"


def test_every_preset_names_a_transform_and_the_api_offers_exactly_them():
    assert set(PRIVACY_PRESETS.values()) <= set(PRESETS)
    assert set(get_args(PresetIn.model_fields["preset"].annotation)) == set(PRIVACY_PRESETS)
    for preset, transform in PRIVACY_PRESETS.items():
        assert preset_of_transform(transform) == preset
    assert preset_of_transform("dct8-low15") == "dct8-low15"  # outside every preset: names itself
    with pytest.raises(ValueError, match="preset must be one of"):
        check_preset("paranoid")


def test_settings_refuse_an_unknown_default_preset():
    assert GatewaySettings(default_preset="strict").default_preset == "strict"
    with pytest.raises(ValueError, match="preset must be one of"):
        GatewaySettings(default_preset="paranoid")
    assert GatewaySettings(bundled_model_dir="").bundled_model_dir is None


@pytest.fixture
def sessions(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'gateway.db'}")
    Base.metadata.create_all(engine)
    return make_sessionmaker(engine)


def add_version(session: Session, version: str, preset: str) -> None:
    session.add(ModelVersion(version=version, path=f"{version}/model.onnx", sha256="0" * 64, transform_id="t",
                             params_hash="0" * 16, embedding_dim=128, threshold=0.5, metrics={}, preset=preset))
    session.flush()


def test_activation_replaces_only_the_same_presets_version(sessions):
    with session_scope(sessions) as session:
        for version, preset in (("a1", "accurate"), ("b1", "balanced"), ("b2", "balanced"), ("s1", "strict")):
            add_version(session, version, preset)
        for version in ("a1", "b1", "s1"):
            activate_version(session, version)
        assert {p: r.version for p, r in active_versions(session).items()} == \
            {"accurate": "a1", "balanced": "b1", "strict": "s1"}
        activate_version(session, "b2")
        assert {p: r.version for p, r in active_versions(session).items()} == \
            {"accurate": "a1", "balanced": "b2", "strict": "s1"}
        assert session.get(ModelVersion, "b1").status == "retired"
        assert active_version(session, "balanced").version == "b2"
        assert active_version(session, "strict").version == "s1"


def test_a_preset_without_an_active_model_is_a_503_not_another_presets_model(tmp_path):
    models = ServedModels(tmp_path, prefer_gpu=False, batch_max=4, batch_wait_ms=1.0, default_preset="balanced")
    with pytest.raises(Problem) as info:
        models.for_preset("strict")
    assert info.value.status == 503 and "strict" in info.value.detail
    with pytest.raises(Problem):
        models.active  # the default preset has none either


@pytest.mark.skipif(not BUNDLED.is_dir(), reason="no bundled models in this checkout")
def test_the_bundled_models_cover_every_preset_and_carry_their_figures():
    metas = [ModelMetadata.load(d, verify=True) for d in bundled_versions(BUNDLED)]
    assert {preset_of_transform(m.spec.name) for m in metas} == set(PRIVACY_PRESETS)
    for meta in metas:
        assert meta.impostor_curve, f"{meta.version}: no impostor curve (identify thresholds)"
        heldout = meta.metrics["heldout"]
        assert heldout["num_pairs"] == 3000 and "folds 6,7,8,9,10" in meta.metrics["protocol"]
        assert (d := BUNDLED / meta.version / meta.onnx_file).stat().st_size < 10 * 2**20, d


@pytest.mark.skipif(not BUNDLED.is_dir(), reason="no bundled models in this checkout")
def test_install_bundled_activates_each_preset_once_and_never_overrides_an_admin(sessions, tmp_path):
    model_dir = tmp_path / "models"
    with session_scope(sessions) as session:
        activated = install_bundled(session, model_dir, BUNDLED)
    assert len(activated) == len(PRIVACY_PRESETS)
    with session_scope(sessions) as session:
        rows = active_versions(session)
        assert set(rows) == set(PRIVACY_PRESETS)
        balanced = rows["balanced"].version
        # an admin activates another version of the balanced preset; a restart must keep that choice
        add_version(session, "admin-choice", "balanced")
        activate_version(session, "admin-choice")
    with session_scope(sessions) as session:
        assert install_bundled(session, model_dir, BUNDLED) == []
        assert active_version(session, "balanced").version == "admin-choice"
        assert session.get(ModelVersion, balanced).status == "retired"
    # a damaged copy in the model directory is replaced from the bundle
    copy = model_dir / balanced / "model.onnx"
    copy.write_bytes(b"damaged")
    with session_scope(sessions) as session:
        install_bundled(session, model_dir, BUNDLED)
    assert ModelMetadata.load(model_dir / balanced, verify=True).version == balanced


def test_a_damaged_bundle_is_an_error_not_a_silent_skip(tmp_path):
    if not BUNDLED.is_dir():
        pytest.skip("no bundled models in this checkout")
    source = next(iter(bundled_versions(BUNDLED)))
    damaged = tmp_path / "bundle" / source.name
    shutil.copytree(source, damaged)
    meta = json.loads((damaged / "model.json").read_text())
    (damaged / meta["onnx_file"]).write_bytes(b"not the model")
    with pytest.raises(ValueError):
        bundled_versions(tmp_path / "bundle")


# -- a real stack serving the bundled models side by side ---------------------------------------------------

@pytest.fixture(scope="module")
def preset_stack(tmp_path_factory, shared):
    if not BUNDLED.is_dir():
        pytest.skip("no bundled models in this checkout")
    from devtools.localstack import LocalStack

    workdir = tmp_path_factory.mktemp("preset-stack")
    stack = LocalStack(workdir, model_dir=workdir / "models", extra_env={
        "PRIVFACE_BUNDLED_MODEL_DIR": str(BUNDLED), "PRIVFACE_DEFAULT_PRESET": "balanced"}).start()
    yield stack
    stack.stop()


@pytest.mark.slow
def test_tenants_choose_a_preset_and_each_is_served_by_its_own_model(preset_stack, shared):
    import httpx

    from inference.transform import TransformSpec
    from tests.test_gateway_api import aligned_face, assert_problem, auth, payload

    stack = preset_stack
    key, other_key = stack.api_key("enroll", "verify", "admin"), stack.api_key("verify", tenant="other")
    url = stack.url

    def transform(k: str) -> tuple[str, TransformSpec]:
        advertised = httpx.get(url + "/v1/transforms", headers=auth(k)).json()
        assert len(advertised) == 1
        return advertised[0]["preset"], TransformSpec.from_dict(advertised[0]["spec"])

    def verify(spec: TransformSpec, subject: str, face) -> httpx.Response:
        return httpx.post(url + "/v1/verify", json={"subject_id": subject, "features": payload(spec, face)},
                          headers=auth(key), timeout=120)

    ready = httpx.get(url + "/readyz").json()["checks"]["model"]
    assert set(ready["presets"]) == set(PRIVACY_PRESETS) and ready["default_preset"] == "balanced"
    preset, balanced = transform(key)
    assert preset == "balanced" and balanced.name == PRIVACY_PRESETS["balanced"]
    face = aligned_face(shared, "Aaron_Eckhart/Aaron_Eckhart_0001.jpg")
    stranger = aligned_face(shared, "George_W_Bush/George_W_Bush_0001.jpg")
    subject = httpx.post(url + "/v1/subjects", json={}, headers=auth(key)).json()["id"]
    enrolled = httpx.post(f"{url}/v1/subjects/{subject}/enrollments", json={"features": payload(balanced, face)},
                          headers=auth(key), timeout=120)
    assert enrolled.status_code == 201, enrolled.text
    assert verify(balanced, subject, face).json()["match"] is True
    assert verify(balanced, subject, stranger).json()["match"] is False
    accurate = PRESETS[PRIVACY_PRESETS["accurate"]]()  # served too, but not to this tenant
    assert_problem(verify(accurate, subject, face), 422, "unknown-transform")

    refused = httpx.put(url + "/v1/admin/tenant/preset", json={"preset": "paranoid"}, headers=auth(key))
    assert_problem(refused, 422, "validation-error")
    assert transform(key)[0] == "balanced", "a refused change changes nothing"
    changed = httpx.put(url + "/v1/admin/tenant/preset", json={"preset": "strict"}, headers=auth(key))
    assert changed.status_code == 200, changed.text
    assert changed.json()["preset"] == "strict" and changed.json()["reenroll_needed"] == 1
    preset, strict = transform(key)
    assert preset == "strict" and strict.name == PRIVACY_PRESETS["strict"]
    assert transform(other_key)[0] == "balanced", "another tenant keeps the default"
    assert_problem(verify(balanced, subject, face), 422, "unknown-transform")
    assert_problem(verify(strict, subject, face), 409, "subject-not-enrolled")
    again = httpx.post(f"{url}/v1/subjects/{subject}/enrollments", json={"features": payload(strict, face)},
                       headers=auth(key), timeout=120)
    assert again.status_code == 201, again.text
    matched = verify(strict, subject, face).json()
    assert matched["match"] is True and matched["model_version"] == ready["presets"]["strict"]
    assert verify(strict, subject, stranger).json()["match"] is False


CARDS = {"v1-accurate": "gpu-v0", "v5-balanced": "cpu-low12-warm", "v1-strict": "gpu-low21"}


@pytest.mark.skipif(not BUNDLED.is_dir(), reason="no bundled models in this checkout")
@pytest.mark.parametrize("version", sorted(CARDS))
def test_each_bundled_model_has_a_card_generated_from_its_measured_figures(version):
    """The committed card is exactly what training_jobs.model_card renders from model.json, the training config
    and the attack results: a figure changed in one place and not the other fails here."""
    from training_jobs.model_card import render
    from training_jobs.train_config import load_config
    root = PROJECT_ROOT
    expected = render(ModelMetadata.load(BUNDLED / version), load_config(root / "training_jobs" / "configs" /
                      f"{CARDS[version]}.yaml"), json.loads((root / "docs" / "attacks" / "results.json").read_text()))
    assert (root / "docs" / "models" / f"card-{version}.md").read_text() == expected
