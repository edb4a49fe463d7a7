"""A face model designed to be evaluated under MPC (issue 12, sealed mode): a small CNN on the 14x14 DCT planes.

Why a different model: under two-party MPC with public weights, convolutions and linear layers are local
(free of communication); only the non-linear activations cost rounds and bytes. The served network upsamples
to 112x112 pixels and runs ~11M ReLU6 comparisons with flip test-time augmentation (15 s per image measured
under CrypTen); this student works directly on the SDK's frequency planes at 14x14 and 7x7, with ~75k
activations, and BatchNorm layers that fold into the preceding convolution at export.

Test-time flip (optional per served model): the mirror image's planes are the planes themselves, each plane's 14
block columns reversed and the channels of odd horizontal frequency negated (`flip_planes`), a signed permutation:
local on additive shares, so under MPC it costs one more image through the network (same rounds, twice the bytes)
and no new input from the SDK. The embedding is then e(x) + e(flip x).

Activation: `relu` (one secure comparison per element) or `quad` = 0.125x^2 + 0.5x + 0.25 (one Beaver
multiplication per element, ~10x cheaper under MPC). The quadratic is the tangent-matched approximation of
softplus around 0; the BatchNorm before each activation keeps its input near unit scale so the square does not
overflow fixed point.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from inference.transform import TransformSpec, kept_index

ACTIVATIONS = ("relu", "quad")
# How the 7x7 map becomes the embedding: `dense`, one linear layer over all 2w x 49 values (sealed-v1..v5), or
# `gdc`, a 7x7 depthwise weighting per channel then a channel mix (MobileFaceNet's global depthwise head: 1/49 of
# the parameters, the same weight map shared by every output). Both are linear, so both export as one linear layer
# and cost nothing under MPC.
HEADS = ("dense", "gdc")


class Quad(nn.Module):
    """0.125 x^2 + 0.5 x + 0.25: a degree-2 activation, one multiplication under MPC."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.125 * x * x + 0.5 * x + 0.25


def activation(kind: str) -> nn.Module:
    if kind == "relu":
        return nn.ReLU()
    if kind == "quad":
        return Quad()
    raise ValueError(f"activation must be one of {ACTIVATIONS}, not {kind!r}")


def conv_block(cin: int, cout: int, stride: int, kind: str) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), activation(kind))


class SealedCnn(nn.Module):
    """[B, K, 14, 14] frequency planes -> raw 128-d embedding (not normalised: the margin head sees it).

    Two stages of `depth` convolution blocks each: `width` channels at 14x14, then `2 * width` at 7x7 (the first
    block of the second stage strides). Depth 2 is the sealed-v1..v4 architecture. Under MPC each block adds
    one activation layer, i.e. a fixed number of rounds, whatever its width (docs/sealed.md)."""

    def __init__(self, channels: int, kind: str = "quad", width: int = 128, embedding: int = 128,
                 depth: int = 2, head: str = "dense") -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be at least 1, not {depth}")
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, not {head!r}")
        self.input_norm = nn.BatchNorm2d(channels)  # the planes' scales differ by 100x; folds into conv 1
        first = [conv_block(channels if i == 0 else width, width, 1, kind) for i in range(depth)]
        second = [conv_block(width if i == 0 else 2 * width, 2 * width, 2 if i == 0 else 1, kind) for i in range(depth)]
        self.features = nn.Sequential(*first, *second)  # 14x14 -> 7x7 at the first block of `second`
        self.head = head
        if head == "gdc":  # one 7x7 weight map per channel, then a channel mix (MobileFaceNet's embedding head)
            self.gdc = nn.Conv2d(2 * width, 2 * width, 7, groups=2 * width, bias=False)
            self.gdc_norm = nn.BatchNorm2d(2 * width)
            self.embed = nn.Linear(2 * width, embedding, bias=False)
        else:
            self.embed = nn.Linear(2 * width * 7 * 7, embedding, bias=False)
        self.embed_norm = nn.BatchNorm1d(embedding)

    def forward(self, planes: torch.Tensor) -> torch.Tensor:
        return self.stages(planes)[2]

    @property
    def stage_channels(self) -> tuple[int, int]:
        """Channels of the two maps `stages` returns."""
        convs = [m for m in self.features.modules() if isinstance(m, nn.Conv2d)]
        return convs[len(convs) // 2 - 1].out_channels, convs[-1].out_channels

    def stages(self, planes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the 14x14 map at the end of the first stage, the 7x7 map at the end of the second, the raw embedding):
        the maps are what hint distillation (training_jobs/hints.py) matches to the teacher's."""
        depth = len(self.features) // 2
        first = self.features[:depth](self.input_norm(planes))
        x = second = self.features[depth:](first)
        if self.head == "gdc":
            x = self.gdc_norm(self.gdc(x))
        embedding: torch.Tensor = self.embed_norm(self.embed(torch.flatten(x, 1)))
        return first, second, embedding

    def activation_count(self, height: int = 14, width: int = 14) -> int:
        """Elements that pass through a non-linearity per image: what the MPC cost scales with."""
        count, h, w = 0, height, width
        for conv in (m for m in self.features.modules() if isinstance(m, nn.Conv2d)):
            h, w = (h + 2 - 3) // conv.stride[0] + 1, (w + 2 - 3) // conv.stride[1] + 1
            count += conv.out_channels * h * w
        return count


def head_of(weights: dict[str, torch.Tensor]) -> str:
    """The `head` of a SealedCnn state dict."""
    return "gdc" if "backbone.gdc.weight" in weights else "dense"


def depth_of(weights: dict[str, torch.Tensor]) -> int:
    """The `depth` of a SealedCnn state dict (its convolution blocks, two stages)."""
    blocks = {key.split(".")[2] for key in weights if key.startswith("backbone.features.") and key.endswith(".0.weight")}
    return len(blocks) // 2


def flip_signs(spec: TransformSpec) -> list[int]:
    """Per feature channel, +1 or -1: the sign a horizontal mirror gives its coefficient, (-1)^v for horizontal
    frequency v (frequency index k = 8u + v, inference/transform.py)."""
    _, freqs = kept_index(spec)
    return [int(v) for v in np.where(freqs % 2 == 1, -1, 1)]  # v = k % 8 is odd exactly when k is (8u is even)


def flip_planes(features: torch.Tensor, signs: Sequence[int]) -> torch.Tensor:
    """[B, K, 14, 14] planes of the horizontally mirrored faces (exact: the 8x8 blocks tile the face)."""
    sign = torch.as_tensor(list(signs), dtype=features.dtype, device=features.device).view(1, -1, 1, 1)
    return torch.flip(features, dims=[-1]) * sign


class SealedFaceModel(nn.Module):
    """Same interface as FrequencyFaceModel (adapter, backbone, forward -> unit embedding) so the trainer,
    the evaluation protocol and the export treat both alike. ``flip``: the channel signs of `flip_signs` to embed
    e(x) + e(flip x) (test time only; training sees one view, flips come from the augmentation)."""

    def __init__(self, backbone: SealedCnn, flip: Sequence[int] | None = None) -> None:
        super().__init__()
        self.adapter = nn.Identity()
        self.backbone = backbone
        self.flip = list(flip) if flip is not None else None

    def raw(self, features: torch.Tensor) -> torch.Tensor:
        """The un-normalised embedding, as the MPC computes it before its unit normalisation."""
        embedding: torch.Tensor = self.backbone(self.adapter(features))
        if self.flip is not None:
            embedding = embedding + self.backbone(self.adapter(flip_planes(features, self.flip)))
        return embedding

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.raw(features), dim=1)


def _bn_affine(bn: nn.BatchNorm1d | nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of an eval-mode BatchNorm: y = scale * x + shift, per channel."""
    assert bn.running_var is not None and bn.running_mean is not None
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias.detach() - bn.running_mean * scale


def folded_layers(model: SealedFaceModel | SealedCnn) -> list[dict[str, object]]:
    """The student as a plain list of layers with every BatchNorm folded, for the MPC evaluator
    (``secure/mpc/protocols/sealed_model.py``), which may not import this package.

    Layers: ``affine`` (per-channel scale and shift: the input BatchNorm, which cannot fold into the first
    convolution exactly because of its zero padding), ``conv`` (BatchNorm folded into weight and bias), ``act``
    (``relu`` or ``quad``), ``flatten``, ``linear`` (the embedding BatchNorm folded in). Arrays are float64 numpy.
    The plaintext twin is the PyTorch model in eval mode (tests/test_sealed_mpc.py checks both agree)."""
    cnn = model.backbone if isinstance(model, SealedFaceModel) else model
    layers: list[dict[str, object]] = []
    scale, shift = _bn_affine(cnn.input_norm)
    layers.append({"op": "affine", "scale": scale.double().numpy(), "shift": shift.double().numpy()})
    for block in cnn.features:
        assert isinstance(block, nn.Sequential)
        conv, bn, act = block[0], block[1], block[2]
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
        s, b = _bn_affine(bn)
        weight = conv.weight.detach() * s.view(-1, 1, 1, 1)
        layers.append({"op": "conv", "weight": weight.double().numpy(), "bias": b.double().numpy(),
                       "stride": int(conv.stride[0]), "padding": int(conv.padding[0])})
        layers.append({"op": "act", "kind": "relu" if isinstance(act, nn.ReLU) else "quad"})
    layers.append({"op": "flatten"})
    weight, bias = _embedding_map(cnn)
    layers.append({"op": "linear", "weight": weight.double().numpy(), "bias": bias.double().numpy()})
    return layers


def _embedding_map(cnn: SealedCnn) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) with embedding = W @ flatten(x) + b for the 7x7 map x: the head and its BatchNorms as one linear layer.

    gdc: y_c = a_c * sum_p g_cp x_cp + d_c (depthwise conv + its BatchNorm), z = s * (L y) + t, so
    W[o, c*49 + p] = s_o L_oc a_c g_cp and b = s * (L d) + t."""
    s, t = (value.double() for value in _bn_affine(cnn.embed_norm))
    linear = cnn.embed.weight.detach().double()
    if cnn.head == "dense":
        return linear * s.view(-1, 1), t
    a, d = (value.double() for value in _bn_affine(cnn.gdc_norm))
    spatial = cnn.gdc.weight.detach().double().flatten(1)  # [C, 49]
    weight = (s.view(-1, 1, 1) * linear.unsqueeze(2) * (a.view(-1, 1) * spatial).unsqueeze(0)).flatten(1)
    return weight, s * (linear @ d) + t
