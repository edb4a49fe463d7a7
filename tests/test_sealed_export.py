"""The served sealed model (issue 12): `python -m inference.sealed_export` builds it from any sealed-cnn checkpoint;
the party reads back exactly the student the checkpoint holds; a damaged file is refused; the committed bundle is
complete and calibrated on people in no View-2 fold."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from common.paths import PROJECT_ROOT
from inference.lfw import images_outside_pairs, lfw_dir, load_many
from inference.operating_points import ImpostorCurve
from inference.sealed_export import SEALED_FILE, main
from inference.sealed_student import SealedCnn, SealedFaceModel
from inference.transform import PRESETS, OsNoise, TransformSpec
from secure.party.sealed import load_sealed_model
from tests.test_sealed_mpc import run_folded


def fake_checkpoint(path, width: int, embedding: int) -> SealedFaceModel:
    """A checkpoint as training_jobs.train writes it, of a random student with non-trivial BatchNorm statistics."""
    spec = PRESETS["dct8-v0"](64.0)
    torch.manual_seed(1)
    model = SealedFaceModel(SealedCnn(spec.num_channels, "quad", width, embedding))
    for module in model.modules():
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    torch.save({"epoch": 1, "config": {"name": "fake", "model": {"kind": "sealed-cnn", "activation": "quad",
                                                                  "width": 999}},
                "student": model.state_dict(), "transform": spec.to_dict()}, path)
    return model.eval()


def test_the_builder_writes_the_checkpoints_student_and_a_calibrated_threshold(tmp_path):
    model = fake_checkpoint(tmp_path / "last.pt", width=8, embedding=32)  # width read from the weights, not config
    main(["--checkpoint", str(tmp_path / "last.pt"), "--version", "sealed-test", "--out-dir", str(tmp_path / "out")])
    meta = json.loads((tmp_path / "out" / "sealed-test" / SEALED_FILE).read_text())
    spec = TransformSpec.from_dict(meta["transform"])
    assert (meta["transform_id"], meta["params_hash"], meta["embedding_dim"]) == (spec.transform_id, spec.params_hash, 32)
    curve = ImpostorCurve.from_dict(meta["impostor_curve"])
    assert "no View-2 fold" in curve.source and meta["threshold"] == pytest.approx(curve.threshold(1e-3))
    served = load_sealed_model(tmp_path / "out", "sealed-test")
    lfw = lfw_dir()
    features = spec.apply(load_many(lfw, images_outside_pairs(lfw)[:3])[0], OsNoise()).astype(np.float32)
    with torch.inference_mode():
        expected = model.backbone(torch.from_numpy(features[None])).double()
    got = run_folded(served.layers, torch.from_numpy(features[None]).double())
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    (tmp_path / "out" / "sealed-test" / "layers.npz").write_bytes(b"not the model")
    with pytest.raises(ValueError, match="sha256"):
        load_sealed_model(tmp_path / "out", "sealed-test")


def test_the_committed_bundle_is_complete():
    folder = PROJECT_ROOT / "inference" / "bundled" / "sealed-v1"
    meta = json.loads((folder / SEALED_FILE).read_text())
    served = load_sealed_model(folder.parent, "sealed-v1")
    assert served.dim == meta["embedding_dim"] and served.transform_id == meta["transform_id"]
    assert meta["norm_hint"] > 0 and -1 < meta["threshold"] < 1
    assert "no View-2 fold" in meta["threshold_source"]
    assert not (folder / "model.json").exists()  # the ONNX installer must not take it for a gateway model


def test_a_party_blames_the_caller_only_for_an_envelope_it_cannot_open():
    """422 for the envelope (the caller's input); 503 for what the gateway adds (model, rotation): a deployment
    fault. A scaled rotation would change what a score means, so only an orthogonal one is taken."""
    import base64

    from client.sealed import seal_features
    from common.problems import Problem
    from secure.party.api import SealedEnvelope, SealedIn
    from secure.party.sealed import SealedInputs
    from secure.sealed_box import PartyKey

    keys = [PartyKey.generate(), PartyKey.generate()]
    root = PROJECT_ROOT / "inference" / "bundled"
    model = load_sealed_model(root, "sealed-v1")
    context = {"transform_id": model.transform_id, "shape": list(model.shape), "nonce": "0f" * 16}
    envelopes = seal_features(np.zeros(model.shape), {r: keys[r].public_b64 for r in (0, 1)}, context)

    def body(rank: int, rotation: np.ndarray, version: str = "sealed-v1") -> SealedIn:
        return SealedIn(model=version, transform_id=model.transform_id, shape=list(model.shape), nonce="0f" * 16,
                        envelope=SealedEnvelope(**envelopes[rank]),
                        rotation=base64.b64encode(rotation.astype("<f8").tobytes()).decode())

    inputs = SealedInputs(0, keys[0], root)
    eye = np.eye(model.dim)
    query = inputs.query(body(0, eye))
    assert query.features.shape == (1, *model.shape) and query.dim == model.dim
    for wrong, status, slug in ((body(1, eye), 422, "sealed-envelope"), (body(0, 2 * eye), 503, "sealed-rotation"),
                                (body(0, eye, "sealed-v0"), 503, "sealed-model-unknown")):
        with pytest.raises(Problem) as refused:
            inputs.query(wrong)
        assert (refused.value.status, refused.value.slug) == (status, slug)
