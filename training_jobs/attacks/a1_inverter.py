"""A1: a small CNN that inverts the feature planes back to the 112x112 face (L1 + optional SSIM loss).

Design, for one CPU thread: almost all the work happens on the 14x14 block grid. A stem and residual 3x3
convolutions there give each block a view of its neighbours (receptive field 19 blocks: the whole face), which
is what recovers the removed low frequencies (DC, first AC terms) from context; a 1x1 convolution then predicts
the 8x8x3 pixels of every block and PixelShuffle(8) lays them out, as an inverse DCT would. A light full
resolution convolution smooths block seams.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from inference.transform import BLOCK


class ResBlock(nn.Module):
    """conv-ReLU-conv plus identity; no normalisation, so train and eval behave alike."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        assert self.conv2.bias is not None  # nn.Conv2d has one unless built with bias=False
        nn.init.zeros_(self.conv2.bias)
        self.conv2.weight.data.mul_(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = x + self.conv2(F.relu(self.conv1(x)))
        return result


class Inverter(nn.Module):
    """Normalised features [B, K, 14, 14] -> image [B, 3, 112, 112], about [0, 1]."""

    def __init__(self, channels: int, width: int = 96, blocks: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        self.body = nn.Sequential(*[ResBlock(width) for _ in range(blocks)])
        self.to_pixels = nn.Conv2d(width, 3 * BLOCK * BLOCK, 1)
        self.shuffle = nn.PixelShuffle(BLOCK)
        self.smooth = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 3, 3, padding=1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        coarse = self.shuffle(self.to_pixels(self.body(F.relu(self.stem(features))))) + 0.5
        result: torch.Tensor = coarse + self.smooth(coarse)
        return result


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - size // 2
    g = torch.exp(-x * x / (2 * sigma * sigma))
    return g / g.sum()


def ssim_torch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean SSIM of images in [0, 1], [B, C, H, W], per channel, gaussian window 11x11 σ 1.5 (differentiable)."""
    channels = a.shape[1]
    g = _gaussian_window().to(a)
    wx = g.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    wy = g.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(x, wx, groups=channels), wy, groups=channels)

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a * mu_a
    var_b = blur(b * b) - mu_b * mu_b
    cov = blur(a * b) - mu_a * mu_b
    return (((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))).mean()


def image_loss(image: torch.Tensor, clean: torch.Tensor, ssim_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """L1, plus ssim_weight * (1 - SSIM) when ssim_weight > 0."""
    l1 = (image - clean).abs().mean()
    if ssim_weight <= 0:
        return l1, {"l1": l1.item()}
    structural = 1.0 - ssim_torch(image, clean)
    return l1 + ssim_weight * structural, {"l1": l1.item(), "1-ssim": structural.item()}


class A1:
    """The baseline inverter attack."""

    name = "a1"

    def __init__(self, channels: int, ssim_weight: float = 0.0) -> None:
        self.model = Inverter(channels)
        self.ssim_weight = ssim_weight

    def loss(self, features: torch.Tensor, clean: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        return image_loss(self.model(features), clean, self.ssim_weight)

    def reconstruct(self, features: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.model(features)
        return result
