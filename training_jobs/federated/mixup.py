"""Frequency-domain MixUp on the device: a training-time defence against inverting a client's update.

Why: with FedAvg the server sees each client's update, which is a function of the feature maps it trained on;
gradient inversion (`inversion.py`) rebuilds those maps, hence the photos. If every training sample is a
convex mix of k of the owner's feature maps (`TransformSpec.apply` outputs), the update only carries mixes:
the best an inverter can recover is a blend, not one photo. The block DCT is linear, so mixing the features
equals the DCT of the same mix of the pixels (before clipping and noise); the distillation target is the
pixel teacher on that pixel mix, which the device has.

Weights: each of the n samples of a batch mixes k distinct photos (k capped at n) with weights on the simplex
and a floor, w_j >= floor / k, so no photo can dominate a mix (max weight <= 1 - (k - 1) * floor / k), for
both strategies:
- non-adaptive (baseline): flat Dirichlet(1) weights, floored;
- adaptive: a small strategy network maps each candidate map's per-channel energy to a logit, weights =
  floored softmax; it is trained adversarially against the recognition loss (a few gradient-ascent steps on the
  batch before the model's step, inner max of a min-max), so the model trains on the hardest mixes the floor
  allows and learns to recognise through them — the premise being that more photos can then be mixed at the
  same accuracy (measured in docs/federated.md). The strategy network lives on the device for one round.

Randomness here (which photos are mixed, Dirichlet weights, the strategy network's initialisation) comes from
a torch generator seeded from the client's round generator: in simulation that is seeded per (seed, round,
client) for reproducibility; on a real device the round generator is seeded from `secrets`. These values only
shape the training augmentation; they are not cryptographic material and no security claim rests on their
unpredictability (the defence is the averaging itself, measured by the attack).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LossFn = Callable[[torch.Tensor, np.ndarray], torch.Tensor]  # (features, clean pixels) -> recognition loss


@dataclass(frozen=True)
class MixupConfig:
    """MixUp knobs (job param `mixup: {k, adaptive}`; the rest are fixed defaults)."""

    k: int
    adaptive: bool = False
    floor: float = 0.5  # each weight >= floor / k
    strategy_lr: float = 0.05
    strategy_steps: int = 2  # gradient-ascent steps of the strategy per batch (adaptive only)

    def __post_init__(self) -> None:
        if self.k < 2:
            raise ValueError(f"mixup k must be >= 2, not {self.k}")
        if not 0.0 <= self.floor < 1.0:
            raise ValueError(f"mixup floor must be in [0, 1), not {self.floor}")


def mix_indices(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """[n, k] indices: sample i mixes k distinct photos of the batch (a random cyclic window of a shuffle),
    so every photo appears in exactly k mixes."""
    order = torch.randperm(n, generator=generator)
    return order[(torch.arange(n)[:, None] + torch.arange(k)[None, :]) % n]


def floored(simplex: torch.Tensor, floor: float) -> torch.Tensor:
    """Map weights on the simplex [n, k] to weights >= floor / k that still sum to 1."""
    k = simplex.shape[1]
    return floor / k + (1.0 - floor) * simplex


def dirichlet_weights(n: int, k: int, generator: torch.Generator, floor: float) -> torch.Tensor:
    """Flat Dirichlet(1) weights [n, k] (normalised exponentials), floored."""
    u = torch.rand(n, k, generator=generator).clamp_min(1e-12)
    e = -torch.log(u)
    return floored(e / e.sum(1, keepdim=True), floor)


def descriptors(features: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """[n, k, C]: log(1 + mean |feature|) per channel of each candidate map, what the strategy sees."""
    energy = torch.log1p(features.abs().mean(dim=(2, 3)))
    return energy[indices]


class StrategyNet(nn.Module):
    """Per-candidate descriptor [.., C] -> one logit; weights = floored softmax over the k candidates."""

    def __init__(self, channels: int, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, desc: torch.Tensor, floor: float) -> torch.Tensor:
        return floored(F.softmax(self.net(desc).squeeze(-1), dim=1), floor)


def mix(features: torch.Tensor, clean: np.ndarray, indices: torch.Tensor,
        weights: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """Mixed feature maps [n, C, H, W] (differentiable in the weights) and the same mix of the clean pixels
    (float32 RGB [n, 112, 112, 3], detached) for the distillation target."""
    mixed = (weights[:, :, None, None, None] * features[indices]).sum(1)
    w = weights.detach().numpy().astype(np.float32)
    pixels = (w[:, :, None, None, None] * clean[indices.numpy()].astype(np.float32)).sum(1)
    return mixed, pixels


class Mixer:
    """One client's MixUp for one round: picks the mixes of every batch, adaptively or not."""

    def __init__(self, config: MixupConfig, channels: int, seed: int) -> None:
        self.config = config
        self.generator = torch.Generator().manual_seed(seed)  # augmentation only, see the module docstring
        self.strategy: StrategyNet | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        if config.adaptive:
            with torch.random.fork_rng():
                torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=self.generator)))
                self.strategy = StrategyNet(channels)
            self.optimizer = torch.optim.Adam(self.strategy.parameters(), lr=config.strategy_lr)
        self.last_weights: torch.Tensor | None = None

    def weights(self, features: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        if self.strategy is None:
            return dirichlet_weights(len(indices), indices.shape[1], self.generator, self.config.floor)
        result: torch.Tensor = self.strategy(descriptors(features.detach(), indices), self.config.floor)
        return result

    def adapt(self, features: torch.Tensor, clean: np.ndarray, indices: torch.Tensor, loss_fn: LossFn) -> None:
        """Gradient ASCENT of the recognition loss on the strategy's parameters only (the model's gradients are
        not touched: torch.autograd.grad on the strategy's parameters)."""
        assert self.strategy is not None and self.optimizer is not None
        params = list(self.strategy.parameters())
        for _ in range(self.config.strategy_steps):
            mixed, pixels = mix(features.detach(), clean, indices, self.weights(features, indices))
            grads = torch.autograd.grad(loss_fn(mixed, pixels), params)
            for p, g in zip(params, grads):
                p.grad = -g  # maximise the loss
            self.optimizer.step()

    def __call__(self, features: torch.Tensor, clean: np.ndarray,
                 loss_fn: LossFn | None = None) -> tuple[torch.Tensor, np.ndarray]:
        """Replace a batch by as many mixes of k of its photos (k capped at the batch size; a batch of one
        photo cannot be mixed and is returned as it is)."""
        k = min(self.config.k, len(features))
        if k < 2:
            return features, clean.astype(np.float32)
        indices = mix_indices(len(features), k, self.generator)
        if self.strategy is not None and loss_fn is not None:
            self.adapt(features, clean, indices, loss_fn)
        with torch.no_grad():
            weights = self.weights(features, indices)
        self.last_weights = weights
        return mix(features, clean, indices, weights)
