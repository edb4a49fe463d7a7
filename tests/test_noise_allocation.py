"""Allocated noise (issue 10): per-channel ε weights that keep the total budget, and the game that learns them."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from inference import feature_checks as FC
from inference import transform as T
from inference.lfw import lfw_dir
from training_jobs import noise_allocation as NA

LOW8 = T.PRESETS["dct8-low8"](64.0)
EVEN_LOW8_HASH = "48727ba4d499d7d1"  # dct8-low8 at ε 64 before allocations existed (commit 1a286f1)


def weights_with(first: float, channels: int = LOW8.num_channels) -> tuple[float, ...]:
    raw = np.ones(channels)
    raw[0] = first
    return tuple(raw / raw.mean())


def test_an_even_spec_keeps_its_hash_and_serialisation() -> None:
    assert LOW8.params_hash == EVEN_LOW8_HASH and "epsilon_weights" not in LOW8.to_dict()


def test_weights_move_noise_between_channels_and_keep_the_per_image_epsilon() -> None:
    allocated = dataclasses.replace(LOW8, epsilon_weights=weights_with(0.25))
    ratio = allocated.noise_scales() / LOW8.noise_scales()
    assert ratio[0] == pytest.approx(1 / allocated.weights()[0]) and ratio[0] > 3.9
    assert np.allclose(ratio[1:], ratio[1]) and ratio[1] < 1  # the others get less noise
    assert allocated.epsilon_per_image == LOW8.epsilon_per_image
    assert allocated.transform_id == "dct8-y56c5-lap64a" and allocated.params_hash != LOW8.params_hash
    again = T.TransformSpec.from_dict(json.loads(json.dumps(allocated.to_dict())))
    assert again == allocated and again.params_hash == allocated.params_hash
    assert allocated.with_epsilon(32.0).epsilon_weights == allocated.epsilon_weights


@pytest.mark.parametrize("weights", [
    tuple(np.full(LOW8.num_channels, 1.1)),  # more budget than the even spec
    weights_with(0.25)[:-1],  # a channel without a weight
    (0.0,) + weights_with(1.0)[1:],  # a weight of zero would be infinite noise and an unstated budget
])
def test_allocations_that_change_the_budget_or_miss_a_channel_are_refused(weights: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="epsilon_weights"):
        dataclasses.replace(LOW8, epsilon_weights=weights)


def test_a_committed_allocation_is_a_screenable_transform(tmp_path, monkeypatch) -> None:
    (tmp_path / "demo.json").write_text(json.dumps({"base": "dct8-low8", "weights": list(weights_with(0.5))}))
    monkeypatch.setattr(T, "ALLOCATIONS", tmp_path)
    spec = T.spec_allocated("demo", 64.0)
    assert spec.name == "demo" and spec.luma_keep == LOW8.luma_keep and spec.epsilon_weights == weights_with(0.5)
    validated = T.apply(np.zeros((112, 112, 3), np.uint8), spec, np.random.default_rng(0))
    FC.validate_features(validated, spec)  # the server's bounds follow the allocated noise scales


def test_allocation_weights_average_one_and_start_even() -> None:
    assert torch.equal(NA.allocation_weights(torch.zeros(5)), torch.ones(5))
    assert float(NA.allocation_weights(torch.tensor([3.0, -1.0, 0.5])).mean()) == pytest.approx(1.0)


def test_standard_laplace_has_unit_scale() -> None:
    draws = NA.standard_laplace((200_000,), torch.Generator().manual_seed(0))
    assert abs(float(draws.mean())) < 0.01 and float(draws.abs().mean()) == pytest.approx(1.0, abs=0.01)


class ReadsOneChannel(torch.nn.Module):
    """A 'recogniser' that sees only channel `index`: its embedding is that channel's 14x14 plane."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(features[:, self.index].flatten(1), dim=1)


def test_the_allocation_gives_its_budget_to_the_channel_recognition_needs() -> None:
    """With recognition dominant (large mu), one step must raise the ε of the one channel the model reads and
    lower every other channel's: the direction the Lagrangian asks for."""
    spec = T.make_spec("tiny", (5, 6, 7), (1,), 64.0)
    game = NA.Game(spec, lr=1e-3, alloc_lr=0.1)
    game.mu, game.even_recognition = 1e3, [0.0]
    generator = torch.Generator().manual_seed(0)
    clean = torch.randn(16, spec.num_channels, 14, 14) * torch.as_tensor(spec.channel_std).view(1, -1, 1, 1)
    model = ReadsOneChannel(2)
    features = game.noisy(clean, generator)
    game.allocation_step(model, features, model(clean), torch.rand(16, 3, 112, 112), slack=0.0)
    weights = NA.allocation_weights(game.logits).detach()
    assert weights[2] > 1.0 and bool((weights[[0, 1, 3, 4]] < 1.0).all())
    assert float(weights.mean()) == pytest.approx(1.0)


@pytest.mark.skipif(not (lfw_dir() / "pairs.txt").exists(), reason="aligned LFW not found")
def test_the_command_learns_resumes_and_writes_an_allocation_of_the_same_budget(tmp_path) -> None:
    model = T.Path(__file__).parents[1] / "training_jobs" / "checkpoints" / "v4-balanced"
    args = ["--base", "dct8-low8", "--model", str(model), "--name", "t", "--steps", "3", "--warmup", "1",
            "--batch", "2", "--threads", "1", "--runs-dir", str(tmp_path / "runs"), "--out-dir", str(tmp_path)]
    NA.main(args[:7] + ["2"] + args[8:])  # stops after 2 steps, checkpoint written at the end
    record = NA.main(args)  # resumes for the third
    assert record["steps"] == 3 and record["data"].startswith("LFW identities outside View-2 folds 6-10")
    spec = dataclasses.replace(LOW8, epsilon_weights=tuple(json.loads((tmp_path / "t.json").read_text())["weights"]))
    assert spec.epsilon_per_image == LOW8.epsilon_per_image
    with pytest.raises(SystemExit, match="no model.onnx"):
        NA.main(args[:3] + [str(tmp_path)] + args[4:])
    with pytest.raises(SystemExit, match="--warmup must be at least 1 and below --steps"):
        NA.main(args[:9] + ["0"] + args[10:])  # no even-allocation loss to hold the multiplier to
