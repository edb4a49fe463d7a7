"""Model v0: frequency features -> exact pixel rebuild -> pretrained MobileFaceNet.

The adapter inverts the transform (except clipping and noise): scatter the K kept channels into the 192
DCT planes (3 colours x 64 frequencies, zeros for removed ones), a 1x1 conv initialised to the exact
inverse DCT, depth-to-space 8 -> 112x112 YCbCr, then YCbCr -> RGB -> /255 -> ImageNet mean/std. With no
training this lets the pixel-domain MobileFaceNet see (a degraded version of) the face; the training
work unfreezes the 1x1 conv via `learnable`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from inference.mobilefacenet import IMAGENET_MEAN, IMAGENET_STD, MobileFaceNet, load_pretrained
from inference.transform import BLOCK, COEFFS, LEVEL_SHIFT, TransformSpec, YCBCR_OFFSET, YCBCR_TO_RGB, \
    dct_matrix, kept_index

PLANES = 3 * COEFFS  # 192 = 3 colours x 64 frequencies


def scatter_weight(spec: TransformSpec) -> torch.Tensor:
    """[192, K, 1, 1] 0/1 matrix putting feature channel i at plane colour*64 + frequency."""
    colours, freqs = kept_index(spec)
    weight = torch.zeros(PLANES, spec.num_channels, 1, 1)
    weight[torch.as_tensor(colours * COEFFS + freqs), torch.arange(spec.num_channels), 0, 0] = 1.0
    return weight


def inverse_dct_weight() -> torch.Tensor:
    """[192, 192, 1, 1]: output c*64 + 8i + j (pixel i,j of the block) from input c*64 + 8u + v.

    Laid out for PixelShuffle(8), which sends channel c*64 + 8i + j to pixel (8h + i, 8w + j).
    """
    d = dct_matrix()
    block = np.einsum("ui,vj->ijuv", d, d).reshape(COEFFS, COEFFS)
    return torch.as_tensor(np.kron(np.eye(3), block), dtype=torch.float32).reshape(PLANES, PLANES, 1, 1)


def colour_weight() -> tuple[torch.Tensor, torch.Tensor]:
    """1x1 conv (weight [3,3,1,1], bias [3]) from YCbCr to ImageNet-normalised RGB/255."""
    std = np.asarray(IMAGENET_STD)
    mean = np.asarray(IMAGENET_MEAN)
    weight = YCBCR_TO_RGB / (255.0 * std[:, None])
    bias = -weight @ YCBCR_OFFSET - mean / std
    return (torch.as_tensor(weight, dtype=torch.float32).reshape(3, 3, 1, 1),
            torch.as_tensor(bias, dtype=torch.float32))


class InverseDctAdapter(nn.Module):
    """[N, K, 14, 14] features -> [N, 3, 112, 112] normalised RGB for a pixel-domain backbone."""

    scatter: torch.Tensor  # buffers (register_buffer), declared for the type checker
    colour: torch.Tensor
    colour_bias: torch.Tensor

    def __init__(self, spec: TransformSpec, learnable: bool = False) -> None:
        super().__init__()
        self.register_buffer("scatter", scatter_weight(spec))
        self.idct = nn.Conv2d(PLANES, PLANES, 1, bias=True)
        with torch.no_grad():
            self.idct.weight.copy_(inverse_dct_weight())
            assert self.idct.bias is not None  # built with bias=True
            self.idct.bias.fill_(LEVEL_SHIFT)
        colour, colour_bias = colour_weight()
        self.register_buffer("colour", colour)
        self.register_buffer("colour_bias", colour_bias)
        self.set_learnable(learnable)

    @property
    def learnable(self) -> bool:
        return self.idct.weight.requires_grad

    def set_learnable(self, learnable: bool) -> None:
        """Freeze (v0: exact inverse DCT) or unfreeze the 1x1 conv for fine-tuning."""
        self.idct.requires_grad_(learnable)

    def planes(self, features: torch.Tensor) -> torch.Tensor:
        """[N, 192, 14, 14]: the kept channels in place, zeros where the transform removed a frequency."""
        return F.conv2d(features, self.scatter)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        ycbcr = F.pixel_shuffle(self.idct(self.planes(features)), BLOCK)
        return F.conv2d(ycbcr, self.colour, self.colour_bias)


class BlockContextAdapter(InverseDctAdapter):
    """The inverse-DCT adapter plus a residual estimate of every block's 192 planes from its 5x5 neighbourhood.

    Why: a transform that removes a block's low frequencies removes what the 1x1 adapter cannot bring back, since
    it sees one block at a time; neighbouring blocks' kept coefficients carry some of it (an edge crossing blocks,
    shading). Two 3x3 convolutions over the 14x14 grid of blocks (PReLU) and a 1x1 to the planes; the last one
    starts at zero, so a student built from a served model computes exactly that model's function at step 0.
    """

    def __init__(self, spec: TransformSpec, width: int, learnable: bool = True) -> None:
        super().__init__(spec, learnable)
        self.context = nn.Sequential(nn.Conv2d(spec.num_channels, width, 3, padding=1), nn.PReLU(width),
                                     nn.Conv2d(width, width, 3, padding=1), nn.PReLU(width),
                                     nn.Conv2d(width, PLANES, 1))
        last = self.context[-1]
        assert isinstance(last, nn.Conv2d) and last.bias is not None
        with torch.no_grad():
            last.weight.zero_()
            last.bias.zero_()

    def planes(self, features: torch.Tensor) -> torch.Tensor:
        estimate: torch.Tensor = self.context(features)
        return super().planes(features) + estimate


class FrequencyFaceModel(nn.Module):
    """Features -> L2-normalised (emb(image) + emb(flipped image)), as the pixel model is evaluated."""

    def __init__(self, adapter: InverseDctAdapter, backbone: MobileFaceNet) -> None:
        super().__init__()
        self.adapter = adapter
        self.backbone = backbone

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        image = self.adapter(features)
        both = self.backbone(torch.cat([image, torch.flip(image, dims=[3])], dim=0))
        embedding = both[: image.shape[0]] + both[image.shape[0]:]
        return F.normalize(embedding, dim=1)


def build_model_v0(spec: TransformSpec, shared_dir: Path) -> FrequencyFaceModel:
    """Model v0: fixed exact inverse-DCT adapter + pretrained MobileFaceNet, eval mode, no training."""
    return FrequencyFaceModel(InverseDctAdapter(spec, learnable=False), load_pretrained(shared_dir)).eval()
