"""Sealed mode (issue 12): the sealed student under MPC equals its plaintext twin (the PyTorch student) within
fixed-point error, on shares of real face features, in three real processes (party 0, party 1, the dealer)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.paths import PROJECT_ROOT
from inference.sealed_student import SealedCnn, SealedFaceModel, folded_layers
from secure.mpc.protocols.sealed_model import activation_count, check_layers

EMBEDDING_TOLERANCE = 2e-3  # fixed point (16 fractional bits) through 4 layers, the norm and its inverse root


def run_folded(layers: list[dict], x: torch.Tensor) -> torch.Tensor:
    """The folded layer list evaluated in float64, exactly as the MPC evaluator reads it."""
    for layer in layers:
        if layer["op"] == "affine":
            x = x * torch.from_numpy(layer["scale"]).view(1, -1, 1, 1) + torch.from_numpy(layer["shift"]).view(1, -1, 1, 1)
        elif layer["op"] == "conv":
            x = F.conv2d(x, torch.from_numpy(layer["weight"]), torch.from_numpy(layer["bias"]),
                         stride=layer["stride"], padding=layer["padding"])
        elif layer["op"] == "act":
            x = torch.relu(x) if layer["kind"] == "relu" else 0.125 * x * x + 0.5 * x + 0.25
        elif layer["op"] == "flatten":
            x = x.flatten(1)
        else:
            x = x @ torch.from_numpy(layer["weight"]).T + torch.from_numpy(layer["bias"])
    return x


@pytest.mark.parametrize("kind,depth", [("quad", 2), ("relu", 2), ("quad", 3)])
def test_folding_the_batchnorms_keeps_the_plaintext_twin(kind, depth):
    torch.manual_seed(0)
    model = SealedFaceModel(SealedCnn(6, kind, width=8, depth=depth))
    assert sum(layer["op"] == "act" for layer in folded_layers(model)) == 2 * depth
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)):
        bn.running_mean.uniform_(-0.5, 0.5)  # non-trivial statistics, so a wrong fold shows
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    model.double().eval()
    x = torch.randn(3, 6, 14, 14, dtype=torch.float64)
    layers = folded_layers(model)
    check_layers(layers)
    with torch.no_grad():
        twin = model.backbone(x)
    assert torch.allclose(run_folded(layers, x), twin, atol=1e-9, rtol=1e-9)
    assert activation_count(layers, (6, 14, 14)) == model.backbone.activation_count()


def test_an_unknown_layer_is_refused():
    with pytest.raises(ValueError, match="unknown layer op"):
        check_layers([{"op": "softmax"}])
    with pytest.raises(ValueError, match="unknown activation"):
        check_layers([{"op": "act", "kind": "gelu"}])


@pytest.mark.parametrize("activation", ["quad", "relu"])
def test_the_mpc_student_equals_its_plaintext_twin_on_real_faces(tmp_path, activation):
    """20 images of 10 held-out pairs (LFW folds 6-10, 2 per fold), shared by os.urandom, embedded under MPC in 3
    processes (1 torch thread each): one image alone, then all 20 in one batch (two runs: a run's rounds, not its
    images, set the time on a loaded machine); the twin is the same student in PyTorch."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT_ROOT)}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "bench.sealed_mpc", "--pairs-per-fold", "2", "--single", "1", "--batch", "20",
           "--width", "16", "--activation", activation, "--out", str(out)]
    subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, check=True, timeout=540, capture_output=True)
    result = json.loads((out / "result.json").read_text())
    assert result["images"] == 20 and result["pairs"] == 10
    assert result["max_abs_embedding_error"] < EMBEDDING_TOLERANCE
    assert result["disagreements_beyond_ties"] == 0
    for kind in ("batch1", "batch20"):
        assert min(result[kind]["bytes_per_image"]) > 0 and min(result[kind]["rounds_per_run"]) > 0
    # each party read only its own share file; the shares alone are not the features
    s0, s1 = np.load(out / "share0.npy"), np.load(out / "share1.npy")
    assert not np.array_equal(s0, s1) and np.abs(s0).max() > 2**60
