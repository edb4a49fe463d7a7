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


@pytest.mark.parametrize("kind,depth,head", [("quad", 2, "dense"), ("relu", 2, "dense"), ("quad", 3, "dense"),
                                             ("quad", 2, "gdc")])
def test_folding_the_batchnorms_keeps_the_plaintext_twin(kind, depth, head):
    """The global depthwise head (`gdc`) folds, with its two BatchNorms, into the same single linear layer."""
    torch.manual_seed(0)
    model = SealedFaceModel(SealedCnn(6, kind, width=8, depth=depth, head=head))
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


@pytest.mark.parametrize("activation,flip", [("quad", False), ("relu", False), ("quad", True)])
def test_the_mpc_student_equals_its_plaintext_twin_on_real_faces(tmp_path, activation, flip):
    """20 images of 10 held-out pairs (LFW folds 6-10, 2 per fold), shared by os.urandom, embedded under MPC in 3
    processes (1 torch thread each) through the served ``SealedEmbedder``: one image alone, then all 20 in one batch
    (two runs: a run's rounds, not its images, set the time on a loaded machine); the twin is the same student in
    PyTorch. With ``flip`` both embed e(x) + e(flip x), the parties mirroring their own shares."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT_ROOT)}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "bench.sealed_mpc", "--pairs-per-fold", "2", "--single", "1", "--batch", "20",
           "--width", "16", "--activation", activation, "--out", str(out)] + (["--flip"] if flip else [])
    subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, check=True, timeout=540, capture_output=True)
    result = json.loads((out / "result.json").read_text())
    assert result["images"] == 20 and result["pairs"] == 10 and result["test_time_flip"] == flip
    assert result["max_abs_embedding_error"] < EMBEDDING_TOLERANCE
    assert result["disagreements_beyond_ties"] == 0
    for kind in ("batch1", "batch20"):
        assert min(result[kind]["bytes_per_image"]) > 0 and min(result[kind]["rounds_per_run"]) > 0
    # each party read only its own share file; the shares alone are not the features
    s0, s1 = np.load(out / "share0.npy"), np.load(out / "share1.npy")
    assert not np.array_equal(s0, s1) and np.abs(s0).max() > 2**60


def test_the_mirrored_faces_planes_are_a_signed_permutation_of_the_faces_planes():
    """flip_planes on the clipped planes of a real face = the planes of the mirrored face (float error only), and
    on additive shares the parties' mirrored shares add up to the mirrored planes exactly."""
    from inference.lfw import images_outside_pairs, lfw_dir, load_rgb
    from inference.sealed_student import flip_planes, flip_signs
    from inference.transform import clipped, spec_v0
    from secure import fixedpoint, sharing
    from secure.mpc.protocols.sealed_model import flip_share

    spec = spec_v0(64.0)
    face = load_rgb(lfw_dir(), images_outside_pairs(lfw_dir())[0])  # an aligned 112x112 face
    planes, mirrored = clipped(face[None], spec), clipped(face[None, :, ::-1].copy(), spec)
    signs = flip_signs(spec)
    assert len(signs) == spec.num_channels and set(signs) == {1, -1}
    flipped = flip_planes(torch.from_numpy(planes), signs).numpy()  # the clip bounds are symmetric: it commutes
    assert np.abs(flipped - mirrored).max() < 1e-9 and np.abs(flipped - planes).max() > 1
    s0, s1 = sharing.split(fixedpoint.encode(planes))
    opened = sharing.reconstruct(flip_share(s0, tuple(signs)), flip_share(s1, tuple(signs)))
    assert np.array_equal(opened, fixedpoint.encode(flipped))


def test_a_bundles_flip_signs_are_checked():
    from secure.party.sealed import parse_flip_signs
    assert parse_flip_signs(None, 3) is None and parse_flip_signs([1, -1, 1], 3) == (1, -1, 1)
    for bad in ([1, -1], [1, 0, 1], "1,-1,1", [1, 2, -1], [True, -1, 1], [1.0, -1, 1]):
        with pytest.raises(ValueError, match="flip_signs must be 3 values"):
            parse_flip_signs(bad, 3)
