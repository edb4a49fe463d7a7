"""The adapter's block-context convolutions (inference/frequency_model.py::BlockContextAdapter; issue 10's capacity
experiment): a student built from a served model starts as exactly that model, the new layers learn, the result
exports to ONNX that serves, and a federated job can start from its saved weights.

Real data: the bundled v5-balanced ONNX file, LFW faces of training identities, the served noisy transform.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from common.paths import PROJECT_ROOT
from inference.export import WeightsError, architecture, export_onnx, save_weights, saved_weights
from inference.frequency_model import BlockContextAdapter
from inference.metadata import ModelMetadata
from inference.runtime import OrtEmbedder
from tests.test_onnx_weights import torch_embed, training_features
from training_jobs.students import build_student

V5 = PROJECT_ROOT / "inference" / "bundled" / "v5-balanced"


def context_student(shared: Path) -> torch.nn.Module:
    meta = ModelMetadata.load(V5)
    config = {"adapter_learnable": True, "context_width": 16, "init_onnx": str(V5 / meta.onnx_file)}
    return build_student(config, meta.spec, shared).eval()


def test_a_context_student_started_from_v5_embeds_exactly_as_v5_does(shared):
    torch.set_num_threads(1)
    meta = ModelMetadata.load(V5)
    features = training_features(shared, meta.spec, count=8)
    student = context_student(shared)
    assert isinstance(student.adapter, BlockContextAdapter)
    reference = OrtEmbedder(V5 / meta.onnx_file, prefer_gpu=False, intra_op_threads=1).embed(features)
    assert float(np.max(np.abs(torch_embed(student, features) - reference))) <= 1e-4


def test_the_context_layers_get_a_gradient_and_change_the_embedding(shared):
    """The zero start must not be a dead end: the last (zero) layer gets a gradient, and one step moves the output."""
    torch.set_num_threads(1)
    meta = ModelMetadata.load(V5)
    features = torch.from_numpy(training_features(shared, meta.spec, count=8))
    student = context_student(shared)
    before = student(features).detach()
    loss = -(student(features) * before.roll(1, dims=0)).sum()  # pull each face toward another: any real loss
    loss.backward()
    last = student.adapter.context[-1]
    assert last.weight.grad is not None and float(last.weight.grad.abs().max()) > 0
    with torch.no_grad():
        for parameter in student.adapter.context.parameters():
            if parameter.grad is not None:
                parameter -= 1e-2 * parameter.grad.sign()
    assert float((student(features).detach() - before).abs().max()) > 1e-3


def test_a_context_model_exports_to_onnx_and_federated_rounds_start_from_it(shared, tmp_path):
    """Served through ONNX Runtime as trained; a federated job's base model is rebuilt with the same context
    (width from the saved tensors) and its context layers travel with the adapter in both scopes."""
    from training_jobs.federated.params import build_base_model, travelling_names
    torch.set_num_threads(1)
    meta = ModelMetadata.load(V5)
    features = training_features(shared, meta.spec, count=4)
    student = context_student(shared)
    with torch.no_grad():
        student.adapter.context[-1].weight.normal_(0, 0.01)  # a trained context, not the zero start
    export_onnx(student, meta.spec, tmp_path / "model.onnx")
    served = OrtEmbedder(tmp_path / "model.onnx", prefer_gpu=False, intra_op_threads=1).embed(features)
    assert float(np.max(np.abs(served - torch_embed(student, features)))) <= 1e-4
    assert architecture(student) == "FrequencyFaceModel/BlockContextAdapter/MobileFaceNet"
    version = tmp_path / "v9-context"
    version.mkdir()
    weights = save_weights(student, version / "weights.pt")
    dataclasses.replace(meta, version="v9-context", weights=weights).save(version)
    found = saved_weights(version)
    assert found is not None and found[0] == version / "weights.pt"
    base = build_base_model(meta.spec, shared, *found).eval()
    assert isinstance(base.adapter, BlockContextAdapter) and base.adapter.context[0].out_channels == 16
    assert float(np.max(np.abs(torch_embed(base, features) - torch_embed(student, features)))) == 0.0
    for scope in ("whole", "adapter-tail"):
        assert "adapter.context.4.weight" in travelling_names(base, scope)
    dataclasses.replace(meta, version="v9-other", weights={**weights, "architecture": "SealedFaceModel"}).save(version)
    with pytest.raises(WeightsError, match="is a SealedFaceModel, not a FrequencyFaceModel"):
        saved_weights(version)


def context_trainer(tmp_path: Path, **optim: float):
    from tests.test_training_jobs import tiny_config
    from training_jobs.train import Trainer
    config = tiny_config(tmp_path, epochs=1)
    config["model"]["context_width"] = 8
    config["optim"].update(optim)
    trainer = Trainer(config)
    lr_of = {id(p): group["initial_lr"] for group in trainer.optimizer.param_groups for p in group["params"]}
    return trainer, config["optim"], lr_of


def test_the_trainer_trains_the_context_at_the_backbones_lr_and_it_moves_off_zero(tmp_path):
    """A tiny real run (4 people x 4 LFW faces of training identities, 2 steps): the context layers train at the
    backbone's lr (1e-3 here, not the adapter's 1e-4) and the zero layer is no longer zero after it."""
    trainer, optim, lr_of = context_trainer(tmp_path)
    assert {lr_of[id(p)] for p in trainer.student.adapter.context.parameters()} == {optim["lr"]} != {optim["adapter_lr"]}
    assert lr_of[id(trainer.student.adapter.idct.weight)] == optim["adapter_lr"]
    trainer.fit()
    assert float(trainer.student.adapter.context[-1].weight.detach().abs().max()) > 0


def test_optim_context_lr_gives_the_context_its_own_lr_and_nothing_else(tmp_path):
    trainer, optim, lr_of = context_trainer(tmp_path, context_lr=5e-3)
    assert {lr_of[id(p)] for p in trainer.student.adapter.context.parameters()} == {5e-3}
    assert {lr_of[id(p)] for p in trainer.student.backbone.parameters()} == {optim["lr"]}
    assert lr_of[id(trainer.student.adapter.idct.weight)] == optim["adapter_lr"]
