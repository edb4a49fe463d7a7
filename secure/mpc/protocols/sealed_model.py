"""Sealed mode (issue 12): the face model evaluated on additive shares of the SDK's features.

The SDK splits its fixed-point features (CrypTen's encoding, 16 fractional bits, Z_2^64) into two additive shares,
one per party; each party wraps its share as a CrypTen ``MPCTensor`` (``input_from_share``) and both run
``private_embedding`` in lockstep. The weights are public to the parties (the model the gateway serves), so
convolutions, the per-channel affine maps and the linear layer are local; only the activations talk: ``quad``
(0.125 x^2 + 0.5 x + 0.25) is one Beaver square per element, ``relu`` one CrypTen comparison. The output is the
unit embedding as shares (``private_unit``: the squared norm and CrypTen's Newton inverse square root under MPC),
which is what gateway mode hands the parties as a query, so the existing score and comparison steps follow.

The layer list comes from ``inference.sealed_student.folded_layers`` (plain dicts of numpy arrays: this package may
not import ``inference``). CrypTen is imported only through the module passed in (``crypten_compat``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

LAYER_OPS = frozenset({"affine", "conv", "act", "flatten", "linear"})
ACTIVATIONS = frozenset({"relu", "quad"})


def check_layers(layers: list[dict[str, Any]]) -> None:
    """Refuse a layer list this evaluator does not know (a model of another kind must not half-run)."""
    if not layers:
        raise ValueError("empty layer list")
    for layer in layers:
        op = layer.get("op")
        if op not in LAYER_OPS:
            raise ValueError(f"unknown layer op {op!r}")
        if op == "act" and layer.get("kind") not in ACTIVATIONS:
            raise ValueError(f"unknown activation {layer.get('kind')!r}")


def activation_count(layers: list[dict[str, Any]], shape: tuple[int, int, int]) -> int:
    """Elements that pass through an activation per image (what the MPC traffic scales with)."""
    channels, h, w = shape
    count = 0
    for layer in layers:
        if layer["op"] == "conv":
            weight = np.asarray(layer["weight"])
            k, stride, pad = weight.shape[-1], int(layer["stride"]), int(layer["padding"])
            channels, h, w = weight.shape[0], (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
        elif layer["op"] == "act":
            count += channels * h * w
    return count


def input_from_share(crypten: ModuleType, share: np.ndarray, device: str = "cpu") -> Any:
    """This party's int64 share of fixed-point features (16 fractional bits) as a CrypTen MPCTensor."""
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(share, dtype=np.int64)).to(device)
    return crypten.mpc.MPCTensor.from_shares(tensor, precision=16)


def output_share(x: Any) -> np.ndarray:
    """This party's int64 share of an MPCTensor (fixed point, 16 fractional bits)."""
    share: np.ndarray = x._tensor.share.detach().cpu().numpy().astype(np.int64)
    return share


def flip_share(share: np.ndarray, signs: tuple[int, ...]) -> np.ndarray:
    """This party's share of the mirrored faces' planes [B, K, H, W]: block columns reversed, channels of odd
    horizontal frequency negated. A signed permutation, so the shares of the mirror are the mirrors of the shares
    (negation wraps in Z_2^64 as the ring does)."""
    sign = np.asarray(signs, dtype=np.int64).reshape(1, -1, 1, 1)
    flipped: np.ndarray = np.ascontiguousarray(share[..., ::-1]) * sign
    return flipped


def _public(array: Any, like: Any) -> Any:
    import torch

    return torch.as_tensor(np.asarray(array), dtype=torch.float32, device=like.device)


def private_embedding(layers: list[dict[str, Any]], x: Any) -> Any:
    """Run the folded layers on the shared features ``x`` [B, K, H, W]; returns the raw embedding [B, d] as shares."""
    check_layers(layers)
    for layer in layers:
        op = layer["op"]
        if op == "affine":
            shape = (1, -1, 1, 1)
            x = x * _public(layer["scale"], x).view(shape) + _public(layer["shift"], x).view(shape)
        elif op == "conv":
            x = x.conv2d(_public(layer["weight"], x), stride=int(layer["stride"]), padding=int(layer["padding"]))
            x = x + _public(layer["bias"], x).view(1, -1, 1, 1)
        elif op == "act" and layer["kind"] == "quad":
            x = (x + 2.0).square() * 0.125 - 0.25  # = 0.125 x^2 + 0.5 x + 0.25, one square
        elif op == "act":
            x = x.relu()
        elif op == "flatten":
            x = x.flatten(start_dim=1)
        else:  # linear
            x = x.matmul(_public(layer["weight"], x).t()) + _public(layer["bias"], x)
    return x


NEWTON_STEPS = 5  # CrypTen's default 3 leaves ~1e-2 relative error at 10x the typical squared norm


def private_unit(e: Any, norm_hint: float) -> Any:
    """e / ||e|| per row under MPC. ``norm_hint`` (a public constant: the typical norm of the plaintext twin's
    embeddings on training images) scales the squared norm near 1, where CrypTen's inverse square root
    (exp-based start, then Newton steps) is accurate; two steps more than CrypTen's default cover squared norms
    up to ~20x the typical one."""
    from crypten.config import cfg  # CrypTen is loaded by the caller (crypten_compat)

    scaled = e * (1.0 / float(norm_hint))
    squared = scaled.square().sum(dim=1, keepdim=True)
    with cfg.temp_override({"functions.sqrt_nr_iters": NEWTON_STEPS}):
        inverse = squared.inv_sqrt()
    return scaled * inverse


@dataclass(frozen=True)
class SealedQuery:
    """A sealed-mode job's input at one party: its share of the SDK's features and what is public to both parties.

    ``features``: int64 [B, K, H, W], this party's additive share (16 fractional bits) opened from its envelope;
    ``layers``: the folded student (``check_layers``); ``norm_hint``: the model's public norm scale; ``rotation``:
    the tenant's protection matrix [d, d] (public to the parties, see docs/security.md); ``digest``: names the
    model and the rotation, so that both parties check they run the same ones before the job starts;
    ``flip_signs``: the model's test-time flip (per channel +-1) or None."""

    features: np.ndarray = field(repr=False)
    layers: list[dict[str, Any]] = field(repr=False)
    norm_hint: float
    rotation: np.ndarray = field(repr=False)
    digest: str
    flip_signs: tuple[int, ...] | None = None

    @property
    def dim(self) -> int:
        return int(self.rotation.shape[0])


class SealedEmbedder:
    """Turns a party's ``SealedQuery`` into its share of the protected unit template, under MPC with the peer: the
    student, the unit normalisation, the tenant's rotation. The output is int64 [B, d] at 16 fractional bits: what
    gateway mode hands the parties as a query share, so the score and comparison steps follow unchanged."""

    def __init__(self, crypten: ModuleType, device: str = "cpu") -> None:
        self.crypten, self.device = crypten, device

    def query(self, sealed: SealedQuery) -> np.ndarray:
        features, batch = sealed.features, len(sealed.features)
        if sealed.flip_signs is not None:  # both images in one pass: the same rounds as one
            features = np.concatenate([features, flip_share(features, sealed.flip_signs)])
        embedding = private_embedding(sealed.layers, input_from_share(self.crypten, features, self.device))
        if sealed.flip_signs is not None:
            embedding = embedding[:batch] + embedding[batch:]
        unit = private_unit(embedding, sealed.norm_hint)
        return output_share(unit.matmul(_public(sealed.rotation, unit).t()))
