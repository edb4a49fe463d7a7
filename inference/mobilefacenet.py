"""MobileFaceNet (128-d), re-implemented so that foamliu's pretrained state_dict loads with strict=True.

Layout and key names follow shared/models/mobilefacenet_foamliu/MANIFEST.txt. Input: RGB /255 then
ImageNet mean/std, [N, 3, 112, 112]; output: the raw (un-normalised) 128-d embedding.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHTS_SUBPATH = Path("models") / "mobilefacenet_foamliu" / "mobilefacenet.pt"
EMBEDDING_DIM = 128
# (expansion t, channels c, repeats n, first stride s) per stage
STAGES = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))


class ConvBNReLU(nn.Sequential):
    """Conv (no bias) -> BN -> ReLU6; keys <name>.0 / <name>.1."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class DepthwiseSeparable(nn.Module):
    """3x3 depthwise -> BN -> ReLU -> 1x1 pointwise -> BN -> ReLU (plain ReLU here, as upstream)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.pointwise = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.depthwise(x)))
        out: torch.Tensor = self.relu(self.bn2(self.pointwise(x)))
        return out


class GlobalDepthwise(nn.Module):
    """7x7 depthwise conv over the whole 7x7 map -> BN: a learned spatial pooling."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 7, groups=channels, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.bn(self.depthwise(x))
        return out


class InvertedResidual(nn.Module):
    """MobileNetV2 block: [1x1 expand] -> 3x3 depthwise -> 1x1 linear -> BN, residual when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = [ConvBNReLU(cin, hidden, kernel=1)] if expand != 1 else []
        layers += [ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + self.conv(x) if self.residual else self.conv(x)
        return out


class MobileFaceNet(nn.Module):
    """[N, 3, 112, 112] normalised RGB -> [N, 128] embedding (not L2-normalised)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = ConvBNReLU(3, 64, stride=2)
        self.dw_conv = DepthwiseSeparable(64)
        blocks, cin = [], 64
        for expand, cout, repeats, stride in STAGES:
            for i in range(repeats):
                blocks.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        self.features = nn.Sequential(*blocks)
        self.conv2 = ConvBNReLU(cin, 512, kernel=1)
        self.gdconv = GlobalDepthwise(512)
        self.conv3 = nn.Conv2d(512, EMBEDDING_DIM, 1)
        self.bn = nn.BatchNorm2d(EMBEDDING_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.dw_conv(self.conv1(x)))
        x = self.bn(self.conv3(self.gdconv(self.conv2(x))))
        return x.flatten(1)


def load_pretrained(shared_dir: Path) -> MobileFaceNet:
    """The pretrained network in eval mode; strict loading proves the architecture matches."""
    model = MobileFaceNet()
    state = torch.load(Path(shared_dir) / WEIGHTS_SUBPATH, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()
