"""A2: A1's inverter plus a refinement CNN, trained with an identity loss through the pixel MobileFaceNet.

The identity loss (1 - cosine between the frozen pretrained MobileFaceNet embeddings of the reconstruction
and of the clean face) pushes the attacker toward what a recogniser needs rather than toward a blurry mean
face. MobileFaceNet is used because it is torch and differentiable here (SFace is an ONNX graph); SFace then
scores the result, so the attack is not judged by the network it was trained against.
Loss = L1(coarse) + L1(refined) [+ SSIM] + identity_weight * identity(refined). Trained from scratch, with the
same wall-clock budget as A1 (the identity network's cost comes out of that budget).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from inference.mobilefacenet import IMAGENET_MEAN, IMAGENET_STD, load_pretrained
from training_jobs.attacks.a1_inverter import Inverter, ResBlock, image_loss


class Refiner(nn.Module):
    """Second stage: image -> image + correction, computed at half resolution (56x56) to stay cheap."""

    def __init__(self, width: int = 24, blocks: int = 2) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, width, 4, stride=2, padding=1)
        self.body = nn.Sequential(*[ResBlock(width) for _ in range(blocks)])
        self.up = nn.ConvTranspose2d(width, 3, 4, stride=2, padding=1)
        nn.init.zeros_(self.up.weight)
        assert self.up.bias is not None  # nn.ConvTranspose2d has one unless built with bias=False
        nn.init.zeros_(self.up.bias)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = image + self.up(self.body(F.relu(self.down(image))))
        return result


class TwoStage(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.inverter = Inverter(channels)
        self.refiner = Refiner()

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        coarse = self.inverter(features)
        return coarse, self.refiner(coarse)


class PixelIdentity(nn.Module):
    """Frozen MobileFaceNet: image in [0, 1] [B, 3, 112, 112] -> L2-normalised 128-d embedding."""

    mean: torch.Tensor  # buffers, registered below (nn.Module's attribute lookup types them as Tensor | Module)
    std: torch.Tensor

    def __init__(self, shared: Path) -> None:
        super().__init__()
        self.net = load_pretrained(shared)
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def train(self, mode: bool = True) -> "PixelIdentity":
        return super().train(False)  # BatchNorm statistics stay the pretrained ones

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net((image - self.mean) / self.std), dim=1)


class A2:
    """Inverter + refiner + identity loss."""

    name = "a2"

    def __init__(self, channels: int, shared: Path, identity_weight: float = 0.5, ssim_weight: float = 0.0) -> None:
        self.model = TwoStage(channels)
        self.identity = PixelIdentity(shared)
        self.identity_weight = identity_weight
        self.ssim_weight = ssim_weight

    def loss(self, features: torch.Tensor, clean: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        coarse, refined = self.model(features)
        coarse_loss, _ = image_loss(coarse, clean, 0.0)
        refined_loss, parts = image_loss(refined, clean, self.ssim_weight)
        with torch.no_grad():
            target = self.identity(clean)
        identity = 1.0 - (self.identity(refined) * target).sum(dim=1).mean()
        total = coarse_loss + refined_loss + self.identity_weight * identity
        return total, {**parts, "identity": identity.item()}

    def reconstruct(self, features: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.model(features)[1]
        return result
