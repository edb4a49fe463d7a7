"""The PyTorch model rebuilt from an ONNX-only model version (inference/onnx_weights.py; issue 11: federated
jobs start from the bundled v1 models).

Real data: the bundled v1 ONNX files, LFW faces of training identities (people in no View-2 fold), the served
noisy transform; ONNX Runtime is the reference.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from common.paths import PROJECT_ROOT
from inference.export import WeightsError, saved_weights
from inference.frequency_model import build_model_v0
from inference.lfw import images_outside_pairs, lfw_dir, load_many
from inference.metadata import ModelMetadata, file_sha256
from inference.onnx_weights import MAX_REBUILD_DIFF, OnnxWeightsError, model_from_onnx
from inference.runtime import OrtEmbedder
from inference.transform import apply

BUNDLED = PROJECT_ROOT / "inference" / "bundled"
V1 = ("v1-accurate", "v5-balanced", "v1-strict")  # the bundled versions shipped as ONNX only


def training_features(shared: Path, spec, count: int = 24) -> np.ndarray:
    """Served (noisy) features of `count` faces of training identities, spread over the list, seed 0."""
    lfw = lfw_dir(shared)
    names = images_outside_pairs(lfw)
    picked = [names[i] for i in np.linspace(0, len(names) - 1, count).astype(int)]
    return apply(load_many(lfw, picked), spec, np.random.default_rng(0)).astype(np.float32)


def torch_embed(model: torch.nn.Module, features: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        result: np.ndarray = model(torch.from_numpy(features)).numpy()
    return result


@pytest.mark.parametrize("version", V1)
def test_rebuilt_v1_embeds_like_onnx_runtime_on_training_identity_faces(version, shared):
    """Max |ORT - PyTorch| <= 1e-4 on 24 real noisy faces; the v0 network on the same faces is far off, so the
    tolerance tells models apart."""
    torch.set_num_threads(1)
    meta = ModelMetadata.load(BUNDLED / version)
    features = training_features(shared, meta.spec)
    model = model_from_onnx(BUNDLED / version / meta.onnx_file, meta.spec)
    reference = OrtEmbedder(BUNDLED / version / meta.onnx_file, prefer_gpu=False, intra_op_threads=1).embed(features)
    diff = float(np.max(np.abs(torch_embed(model, features) - reference)))
    print(f"{version}: max |ORT - rebuilt PyTorch| = {diff:.3g} over {len(features)} faces")
    assert diff <= MAX_REBUILD_DIFF == 1e-4
    assert float(np.max(np.abs(torch_embed(build_model_v0(meta.spec, shared), features) - reference))) > 0.1
    assert not model.training and model.adapter.learnable  # ready to fine-tune with BatchNorm frozen


def edited(tmp_path: Path, edit) -> Path:
    """A copy of v1-accurate's ONNX file changed by `edit(graph)`."""
    graph = onnx.load(str(BUNDLED / "v1-accurate" / "model.onnx"))
    edit(graph)
    path = tmp_path / "model.onnx"
    onnx.save(graph, str(path))
    return path


def initializer(graph, name: str):
    return next(t for t in graph.graph.initializer if t.name == name)


def folded_weight(graph) -> str:
    """The folded weight of the embedding head (backbone.conv3 + backbone.bn)."""
    return next(n.input[1] for n in graph.graph.node if n.name == "/backbone/conv3/Conv")


@pytest.mark.parametrize("version", V1)
def test_every_bundled_version_is_a_base_a_federated_job_can_start_from(version):
    """What saved_weights gives for a bundled version exists and matches its checksum (a model.json naming a
    weights file that was not shipped would let a job be created and fail rounds later)."""
    path, sha = saved_weights(BUNDLED / version)
    assert path.is_file() and file_sha256(path) == sha


def test_a_graph_that_does_not_fit_is_refused_with_one_reason(tmp_path):
    spec = ModelMetadata.load(BUNDLED / "v1-accurate").spec

    def drop(graph):
        graph.graph.initializer.remove(initializer(graph, folded_weight(graph)))

    def reshape(graph):
        name = folded_weight(graph)
        initializer(graph, name).CopyFrom(numpy_helper.from_array(np.zeros((64, 512, 1, 1), np.float32), name))

    def extra(graph):
        graph.graph.initializer.append(numpy_helper.from_array(np.zeros(3, np.float32), "stray"))

    def relu6_to_relu1(graph):  # same tensors, another function: only the ORT check can see it
        bounds = {n.input[2] for n in graph.graph.node if n.op_type == "Clip"}
        for node in graph.graph.node:
            if node.output[0] in bounds:
                node.attribute[0].t.CopyFrom(numpy_helper.from_array(np.array(1.0, np.float32)))

    cases = [(drop, "no initializer"), (reshape, "backbone.conv3.weight: ONNX has"), (extra, "fit no tensor"),
             (relu6_to_relu1, "differs from ONNX Runtime")]
    for edit, reason in cases:
        with pytest.raises(OnnxWeightsError, match=reason):
            model_from_onnx(edited(tmp_path, edit), spec)
    with pytest.raises(OnnxWeightsError):  # another transform's model.json: the kept channels differ
        model_from_onnx(BUNDLED / "v1-accurate" / "model.onnx", ModelMetadata.load(BUNDLED / "v1-strict").spec)


def test_saved_weights_of_an_onnx_only_version_is_its_checked_onnx_file(tmp_path, shared):
    """What a federated job starts from: the bundled version's ONNX file and checksum; the model built from it
    (training_jobs.federated.params) embeds like ORT; a tampered or absent file is refused."""
    from training_jobs.federated.params import build_base_model

    torch.set_num_threads(1)
    meta = ModelMetadata.load(BUNDLED / "v1-accurate")
    path, sha = saved_weights(BUNDLED / "v1-accurate")
    assert (path, sha) == (BUNDLED / "v1-accurate" / "model.onnx", meta.sha256)
    model = build_base_model(meta.spec, shared, path, sha).eval()
    features = training_features(shared, meta.spec, count=4)
    reference = OrtEmbedder(path, prefer_gpu=False, intra_op_threads=1).embed(features)
    assert float(np.max(np.abs(torch_embed(model, features) - reference))) <= MAX_REBUILD_DIFF

    copy = tmp_path / "v1-accurate"
    shutil.copytree(BUNDLED / "v1-accurate", copy)
    (copy / "model.onnx").write_bytes((copy / "model.onnx").read_bytes()[:-10] + b"0" * 10)
    with pytest.raises(WeightsError, match="sha256"):
        saved_weights(copy)
    with pytest.raises(WeightsError, match="sha256"):
        build_base_model(meta.spec, shared, copy / "model.onnx", sha)
    (copy / "model.onnx").unlink()
    with pytest.raises(WeightsError, match="no PyTorch weights"):
        saved_weights(copy)


def test_a_job_may_start_from_bundled_v1_and_is_refused_only_without_weights(tmp_path, postgres_db):
    """federated_job.resolve_base on real PostgreSQL: a registered v1-accurate is accepted as the base; a
    version whose ONNX file is not this architecture answers 409 base-model-not-trainable, nothing fixed."""
    from app.db import make_engine, make_sessionmaker, session_scope
    from app.migrate import migrate_gateway
    from app.models import ModelVersion
    from app.problems import Problem
    from app.services.federated_job import resolve_base
    from app.settings import GatewaySettings

    url = postgres_db()
    migrate_gateway(url)
    sessions = make_sessionmaker(make_engine(url))
    shutil.copytree(BUNDLED / "v1-accurate", tmp_path / "v1-accurate")
    foreign = tmp_path / "foreign"
    shutil.copytree(BUNDLED / "v1-accurate", foreign)
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["features"], ["embedding"])], "other",
        [onnx.helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT, None)],
        [onnx.helper.make_tensor_value_info("embedding", onnx.TensorProto.FLOAT, None)])), str(foreign / "model.onnx"))
    meta = ModelMetadata.load(foreign, verify=False)
    ModelMetadata(**{**meta.__dict__, "version": "foreign", "sha256": file_sha256(foreign / "model.onnx")}).save(foreign)
    with session_scope(sessions) as session:
        for version in ("v1-accurate", "foreign"):
            session.add(ModelVersion(version=version, path=f"{version}/model.onnx", sha256="0" * 64,
                                     transform_id=meta.transform_id, params_hash=meta.params_hash, embedding_dim=128,
                                     threshold=0.3, metrics={}, status="candidate", preset="accurate"))
    settings = GatewaySettings(database_url=url, model_dir=tmp_path)
    with session_scope(sessions) as session:
        fixed = resolve_base(settings, session, {"rounds": 1, "base_version": "v1-accurate"}, "accurate")
        assert fixed["base_version"] == "v1-accurate"
        with pytest.raises(Problem) as refused:
            resolve_base(settings, session, {"rounds": 1, "base_version": "foreign"}, "accurate")
    assert (refused.value.status, refused.value.slug) == (409, "base-model-not-trainable")
    assert "no PyTorch weights" in refused.value.detail and "foreign" in refused.value.detail
