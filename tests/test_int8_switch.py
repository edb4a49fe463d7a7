"""The int8 model reaches service by the operator path of docs/operations.md ("int8: its accuracy cost,
measured"), for real: `inference.quantize` makes it (few calibration photos here, to stay cheap), the admin API
registers and activates it on a real stack (dealer, both parties, gateway), and the gateway serves it. Subjects
enrolled under the float model keep matching there; re-enrolled, they match under int8."""
from __future__ import annotations

import json
import shutil

import pytest
from sqlalchemy import select

from app.db import Base, make_engine, make_sessionmaker, session_scope
from app.models import ModelVersion
from app.services.model_registry import register_model_dir
from bench.int8_switch import BUNDLED, bundled_stack, enroll, served_spec, switch_to, verify
from inference.quantize import BATCH, RANGE_CHUNK, quantize, range_chunk
from inference.metadata import ModelMetadata
from tests.test_gateway_api import aligned_face

FACE, STRANGER = "Aaron_Eckhart/Aaron_Eckhart_0001.jpg", "George_W_Bush/George_W_Bush_0001.jpg"


@pytest.mark.skipif(not BUNDLED.is_dir(), reason="no bundled models in this checkout")
def test_quantize_register_activate_and_serve_the_int8_model(tmp_path, shared):
    stack = bundled_stack(tmp_path / "stack")
    stack.cli("models", "ensure")
    for name in ("dealer", "party0", "party1", "gateway"):
        stack.start_process(name)  # they boot while the int8 file is made
    try:
        # one reader batch of calibration photos and a 300-photo impostor curve: about 20 s instead of 40
        made = quantize(BUNDLED / "v1-accurate", tmp_path / "int8" / "v1-accurate-int8", calibration=16,
                        impostor_images=300).parent
        meta = ModelMetadata.load(made, verify=True)
        assert meta.version == "v1-accurate-int8" and meta.transform_id == "dct8-y63c5-lap64"
        assert meta.impostor_curve and 0.2 < meta.threshold < 0.5, meta.threshold  # its own served threshold
        assert meta.metrics["quantized"]["cosine_to_float_on_calibration"]["min"] > 0.99
        stack.wait_ready()
        key = stack.api_key("enroll", "verify", "admin")
        spec, face, stranger = served_spec(stack, key), aligned_face(shared, FACE), aligned_face(shared, STRANGER)
        subject = enroll(stack, key, spec, face)["subject_id"]
        first = verify(stack, key, spec, subject, face)
        assert first["match"] is True and first["model_version"] == "v1-accurate", first

        switched = switch_to(stack, key, made)
        assert switched["job"]["status"] == "succeeded", switched["job"]
        assert switched["job"]["result"] == {"version": meta.version, "status": "candidate", "sha256": meta.sha256}
        assert switched["activate_status"] == 200 and switched["activated"]["preset"] == "accurate"
        assert switched["served"] == meta.version
        assert f"serving model version {meta.version} for preset accurate" in stack.log("gateway")

        old = verify(stack, key, spec, subject, face)  # its template is under the float model: that one answers
        assert old["match"] is True and old["model_version"] == "v1-accurate", old
        assert verify(stack, key, spec, subject, stranger)["match"] is False
        assert enroll(stack, key, spec, face, subject)["model_version"] == meta.version  # re-enrolled
        new = verify(stack, key, spec, subject, face)
        assert new["match"] is True and new["model_version"] == meta.version, new
        refused = verify(stack, key, spec, subject, stranger)
        assert refused["match"] is False and refused["model_version"] == meta.version
        newcomer = enroll(stack, key, spec, stranger)
        assert newcomer["model_version"] == meta.version
        assert verify(stack, key, spec, newcomer["subject_id"], face)["match"] is False
    finally:
        stack.stop()


def test_the_range_chunk_never_divides_the_batch_count():
    """`--calibration 80` (5 batches, ranges merged every 5) died with ORT's "No data is collected"."""
    assert range_chunk(256) == RANGE_CHUNK  # the documented file (16 batches) is made as before
    for photos in range(1, 700):
        batches = -(-photos // BATCH)
        assert batches % range_chunk(photos), photos
    assert range_chunk(80) == 6  # 5 batches


@pytest.mark.skipif(not BUNDLED.is_dir(), reason="no bundled models in this checkout")
def test_a_version_copied_over_another_versions_directory_is_refused(tmp_path):
    """`cp -r var/int8/v1-accurate $MODEL_DIR/` would overwrite the float version's files: registering the copy
    says so instead of pointing two versions at one file."""
    engine = make_engine(f"sqlite:///{tmp_path / 'gateway.db'}")
    Base.metadata.create_all(engine)
    sessions = make_sessionmaker(engine)
    models = tmp_path / "models"
    shutil.copytree(BUNDLED / "v1-accurate", models / "v1-accurate")
    with session_scope(sessions) as session:
        register_model_dir(session, models, models / "v1-accurate")
    description = json.loads((models / "v1-accurate" / "model.json").read_text())
    (models / "v1-accurate" / "model.json").write_text(json.dumps({**description, "version": "v1-accurate-int8"}))
    with pytest.raises(ValueError, match="directory of its own"), session_scope(sessions) as session:
        register_model_dir(session, models, models / "v1-accurate")
    with session_scope(sessions) as session:
        assert session.execute(select(ModelVersion.version)).scalars().all() == ["v1-accurate"]
