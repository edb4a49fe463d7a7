"""Starting a student from a served ONNX model (`model.init_onnx`, training_jobs/students.py): the rebuilt PyTorch network computes what the
ONNX file computes, for the file's own transform; for another transform only the fixed scatter differs; a file of
another shape is refused, not loaded half-way."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from inference.frequency_model import scatter_weight
from inference.transform import spec_low, spec_v0
from tests.conftest import one_torch_thread
from training_jobs.students import build_student

ROOT = Path(__file__).resolve().parents[1]
SERVED = ROOT / "inference" / "bundled" / "v1-accurate" / "model.onnx"
MODEL = {"adapter_learnable": True, "freeze_backbone_bn": True, "init_onnx": str(SERVED)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    yield from one_torch_thread()


def test_the_warm_started_student_embeds_as_the_served_onnx_model(shared: Path) -> None:
    student = build_student(MODEL, spec_v0(), shared).eval()
    features = np.random.default_rng(0).normal(0.0, 20.0, size=(3, spec_v0().num_channels, 14, 14)).astype(np.float32)
    session = ort.InferenceSession(str(SERVED), providers=["CPUExecutionProvider"])
    served = session.run(None, {session.get_inputs()[0].name: features})[0]
    with torch.no_grad():
        rebuilt = student(torch.from_numpy(features)).numpy()
    assert np.abs(served - rebuilt).max() < 1e-5
    untouched = build_student({**MODEL, "init_onnx": None}, spec_v0(), shared).eval()
    with torch.no_grad():  # the pretrained pixel network behind the exact inverse DCT is another function
        assert np.abs(untouched(torch.from_numpy(features)).numpy() - served).max() > 0.1


def test_another_transform_keeps_its_own_scatter_and_takes_the_served_adapter_map(shared: Path) -> None:
    student = build_student(MODEL, spec_low(6), shared)
    served = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(SERVED)).graph.initializer}
    assert torch.equal(student.adapter.scatter, scatter_weight(spec_low(6)))
    assert np.array_equal(student.adapter.idct.weight.detach().numpy(), served["adapter.idct.weight"])


def test_a_model_of_another_shape_is_refused(shared: Path, tmp_path: Path) -> None:
    model = onnx.load(str(SERVED))
    first = next(n for n in model.graph.node if n.op_type == "Conv" and not n.input[1].startswith("adapter."))
    weight = next(t for t in model.graph.initializer if t.name == first.input[1])
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight)[:32], weight.name))
    onnx.save(model, str(tmp_path / "other.onnx"))
    (tmp_path / "model.json").write_text((SERVED.parent / "model.json").read_text())
    with pytest.raises(ValueError, match="ONNX has .* the model"):
        build_student({**MODEL, "init_onnx": str(tmp_path / "other.onnx")}, spec_v0(), shared)
