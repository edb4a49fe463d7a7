"""A3: regress the pixel MobileFaceNet embedding of the face straight from its features.

This attack succeeds by design: the service exists to recognise faces from these features, so a network that
maps them to a public face model's embedding space must exist (the served model is one). Its rank-1 against a
gallery of clean-photo embeddings shows what the privacy claim cannot cover: anyone holding the features and a
clean photo of a person can tell whether they show that person. The claim can only be about recovering the
IMAGE (A1, A2), not about recognisability.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from training_jobs.attacks.a1_inverter import ResBlock
from training_jobs.attacks.a2_identity import PixelIdentity
from inference.mobilefacenet import EMBEDDING_DIM


class Regressor(nn.Module):
    """Normalised features [B, K, 14, 14] -> L2-normalised embedding [B, 128]."""

    def __init__(self, channels: int, width: int = 128, blocks: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        self.body = nn.Sequential(*[ResBlock(width) for _ in range(blocks)])
        self.down = nn.Conv2d(width, width, 3, stride=2, padding=1)  # 14 -> 7
        self.head = nn.Linear(width * 7 * 7, EMBEDDING_DIM)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.down(self.body(F.relu(self.stem(features)))))
        return F.normalize(self.head(x.flatten(1)), dim=1)


class A3:
    """Features -> pixel-model embedding, cosine loss to the clean face's embedding."""

    name = "a3"

    def __init__(self, channels: int, shared: Path) -> None:
        self.model = Regressor(channels)
        self.identity = PixelIdentity(shared)

    def loss(self, features: torch.Tensor, clean: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.no_grad():
            target = self.identity(clean)
        loss = 1.0 - (self.model(features) * target).sum(dim=1).mean()
        return loss, {"cosine": 1.0 - loss.item()}

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.model(features)
        return result
