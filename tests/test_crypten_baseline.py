"""The CrypTen baseline of sealed mode (bench/crypten_baseline.py): its rewrite of the served model computes the
served model, and CrypTen imports the rewritten graph (the bench's MPC run itself is measured, not tested here)."""
from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
import torch

from bench.crypten_baseline import SERVED, crypten_ready_module, onnx_for_crypten
from inference.metadata import ModelMetadata
from inference.onnx_weights import model_from_onnx


@pytest.fixture(scope="module")
def served():  # noqa: ANN201
    spec = ModelMetadata.load(SERVED, verify=True).spec
    return model_from_onnx(SERVED / "model.onnx", spec), spec


def test_the_rewritten_graph_computes_the_served_model(served):
    model, spec = served
    features = torch.from_numpy(np.random.default_rng(1).normal(0, 20, (3, spec.num_channels, 14, 14))
                                .astype(np.float32))
    with torch.inference_mode():
        expected = model(features)
        rewritten = torch.nn.functional.normalize(crypten_ready_module(model)(features), dim=1)
    assert float((rewritten - expected).abs().max()) < 1e-5


def test_crypten_imports_the_rewritten_graph_and_nothing_it_refuses_is_left(served):
    from secure.mpc.runtime.crypten_compat import load_crypten

    model, spec = served
    graph = onnx_for_crypten(crypten_ready_module(model), torch.zeros(1, spec.num_channels, 14, 14))
    ops = {node.op_type for node in onnx.load_from_string(graph).graph.node}
    assert not ops & {"Identity", "DepthToSpace", "ReduceL2", "Clip"}, ops
    assert {"Conv", "Relu", "MatMul", "Transpose"} <= ops
    crypten = load_crypten()
    imported = crypten.nn.from_onnx(io.BytesIO(graph))
    assert sum(1 for _ in imported.modules()) > 100
