"""Which parameters of the served model travel in a round, and how many bytes that is.

Two scopes, measured in docs/federated.md:
- "whole": every parameter of the adapter (learned inverse DCT) and of MobileFaceNet (~1.04M floats);
- "adapter-tail": the adapter + the last two inverted-residual blocks + the embedding head (conv2, gdconv,
  conv3, bn) (~0.33M floats). Everything else stays frozen at the published model's values on every device.
BatchNorm statistics never travel: clients train with BatchNorm in eval mode (a device has a handful of
photos, far too few for batch statistics), so the running means and variances stay those of the base model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from inference.export import WeightsError, saved_weights
from inference.frequency_model import BlockContextAdapter, FrequencyFaceModel, InverseDctAdapter
from inference.metadata import file_sha256
from inference.mobilefacenet import load_pretrained
from inference.onnx_weights import OnnxWeightsError, state_dict_from_onnx
from inference.transform import TransformSpec

__all__ = ["WeightsError", "saved_weights"]  # where a job's base version is checked (re-exported)
SCOPES = ("whole", "adapter-tail")
TAIL_PREFIXES = ("adapter.", "backbone.features.13.", "backbone.features.14.", "backbone.conv2.",
                 "backbone.gdconv.", "backbone.conv3.", "backbone.bn.")


def build_base_model(spec: TransformSpec, shared: Path, weights: str | Path | None = None,
                     sha256: str | None = None) -> FrequencyFaceModel:
    """The model federated rounds start from, with a learnable adapter: the served v0 (exact inverse-DCT adapter
    + pretrained MobileFaceNet) without `weights`, else that architecture loaded with a model version's saved
    state dict (inference.export.save_weights), checked against `sha256` when given. A state dict with the
    adapter's block-context layers gets a BlockContextAdapter of their width (their tensors travel with the
    adapter's in both scopes)."""
    state = load_weights(Path(weights), sha256, spec) if weights is not None else None
    context = state.get("adapter.context.0.weight") if state is not None else None
    adapter = BlockContextAdapter(spec, int(context.shape[0])) if context is not None \
        else InverseDctAdapter(spec, learnable=True)
    model = FrequencyFaceModel(adapter, load_pretrained(shared))
    if state is not None:
        model.load_state_dict(state)
    return model


def load_weights(path: Path, sha256: str | None, spec: TransformSpec) -> dict[str, torch.Tensor]:
    """A saved state dict, tensors only (weights_only: a weights file cannot run code), checksum verified; an
    ONNX file (a version shipped as ONNX only, inference.export.saved_weights) is rebuilt into one."""
    if not path.is_file():
        raise WeightsError(f"no PyTorch weights at {path}")
    if sha256 is not None and file_sha256(path) != sha256:
        raise WeightsError(f"{path} does not match its recorded sha256")
    if path.suffix == ".onnx":
        try:
            return state_dict_from_onnx(path, spec)
        except OnnxWeightsError as exc:
            raise WeightsError(f"{path}: {exc}") from None
    result: dict[str, torch.Tensor] = torch.load(path, map_location="cpu", weights_only=True)
    return result


def travelling_names(model: torch.nn.Module, scope: str) -> list[str]:
    """Names of the parameters that travel (and train) under `scope`, in a fixed order."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, not {scope!r}")
    names = [name for name, _ in model.named_parameters()]
    return names if scope == "whole" else [n for n in names if n.startswith(TAIL_PREFIXES)]


def freeze_except(model: torch.nn.Module, names: list[str]) -> None:
    """requires_grad only for the travelling parameters: the rest is the published model on every device."""
    keep = set(names)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in keep)


def get_arrays(model: torch.nn.Module, names: list[str]) -> dict[str, np.ndarray]:
    """Copies of the named parameters as float32 numpy arrays (what goes on the wire)."""
    state = dict(model.named_parameters())
    return {name: state[name].detach().cpu().numpy().astype(np.float32, copy=True) for name in names}


def set_arrays(model: torch.nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Load received arrays into the model; refuses unknown names or wrong shapes (a bad message changes nothing)."""
    state = dict(model.named_parameters())
    for name, value in arrays.items():
        if name not in state or tuple(state[name].shape) != tuple(value.shape):
            raise ValueError(f"unexpected parameter {name!r} with shape {tuple(value.shape)}")
    with torch.no_grad():
        for name, value in arrays.items():
            state[name].copy_(torch.as_tensor(value))


def payload_bytes(arrays: dict[str, np.ndarray]) -> int:
    """Raw tensor bytes of one direction of one client's round (message framing excluded)."""
    return int(sum(a.nbytes for a in arrays.values()))
