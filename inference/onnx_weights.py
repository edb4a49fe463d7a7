"""Rebuild the PyTorch model (inverse-DCT adapter + MobileFaceNet) from an exported ONNX file.

Why: the bundled v1 models ship as ONNX only (their GPU checkpoints were never committed), and a federated job
needs PyTorch parameters to start from. The TorchScript exporter (eval mode, constant folding) keeps the
adapter's tensors under their state-dict names but folds every BatchNorm into the convolution before it and
names the folded tensors `onnx::Conv_N`; the Conv node's name (`/backbone/features/features.0/conv/conv.2/Conv`)
still carries the module path. So each tensor is placed by name, and each folded pair is split back as
conv weight = the folded weight, BatchNorm = identity scale (weight 1, running mean 0, running variance
1 - eps) with the folded bias. In eval mode (how federated clients train: BatchNorm frozen) that is the same
function as the ONNX graph; the original split of scale between conv and BatchNorm is not recoverable.
Anything that does not fit (a missing, extra or mis-shaped tensor) is refused with one line, and the result
is checked against ONNX Runtime before it is returned.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from inference.frequency_model import FrequencyFaceModel, InverseDctAdapter
from inference.mobilefacenet import MobileFaceNet
from inference.runtime import OrtEmbedder
from inference.transform import TransformSpec

MAX_REBUILD_DIFF = 1e-4  # max |ORT - PyTorch| over the check batch's embeddings
FIXED_BY_SPEC = ("adapter.scatter", "adapter.colour", "adapter.colour_bias")


class OnnxWeightsError(ValueError):
    """The ONNX file is not a FrequencyFaceModel export this module can rebuild (the reason is one line)."""


def model_from_onnx(path: Path, spec: TransformSpec) -> FrequencyFaceModel:
    """The FrequencyFaceModel (learnable adapter, eval mode) whose parameters are the ONNX file's."""
    model = FrequencyFaceModel(InverseDctAdapter(spec, learnable=True), MobileFaceNet()).eval()
    model.load_state_dict(_state_from_graph(model, onnx.load(str(path))), strict=True)
    diff = _ort_difference(model, Path(path), spec)
    if not diff <= MAX_REBUILD_DIFF:
        raise OnnxWeightsError(f"{Path(path).name}: rebuilt model differs from ONNX Runtime by {diff:.3g} "
                               f"(limit {MAX_REBUILD_DIFF}); the graph is not this architecture")
    return model


def state_dict_from_onnx(path: Path, spec: TransformSpec) -> dict[str, torch.Tensor]:
    """model_from_onnx's state dict (what params.load_weights hands to build_base_model)."""
    return {name: value.detach().clone() for name, value in model_from_onnx(path, spec).state_dict().items()}


def _state_from_graph(model: FrequencyFaceModel, graph: onnx.ModelProto) -> dict[str, torch.Tensor]:
    """Every state-dict entry from the graph's initializers; refuses anything missing, extra or mis-shaped."""
    initializers = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.graph.initializer}
    wanted = {name: value for name, value in model.state_dict().items() if not name.endswith("num_batches_tracked")}
    state: dict[str, torch.Tensor] = {name: initializers[name] for name in wanted if name in initializers}
    used = set(state)
    partners = _batchnorm_after_conv(model)
    modules = dict(model.named_modules())
    for node in graph.graph.node:
        if node.op_type != "Conv" or node.input[1] in wanted:  # a tensor under its own name: placed above
            continue
        inputs = list(node.input[1:])
        absent = [name for name in inputs if name not in initializers]
        if absent:
            raise OnnxWeightsError(f"ONNX Conv {node.name!r} reads {absent[0]!r}, which is no initializer")
        conv_name = _module_path(node.name)
        if not isinstance(modules.get(conv_name), nn.Conv2d):
            raise OnnxWeightsError(f"ONNX Conv {node.name!r} names no convolution of the model ({conv_name!r})")
        if conv_name + ".weight" in state:
            raise OnnxWeightsError(f"two ONNX Conv nodes for {conv_name!r}")
        weight = initializers[inputs[0]]
        bias = initializers[inputs[1]] if len(inputs) > 1 else torch.zeros(weight.shape[0])
        state.update(_unfold(conv_name, partners.get(conv_name), modules, weight, bias))
        used.update(inputs)
    _check(wanted, state, set(initializers) - used)
    state.update({name: value for name, value in model.state_dict().items() if name.endswith("num_batches_tracked")})
    return state


def _unfold(conv_name: str, bn_name: str | None, modules: dict[str, nn.Module], weight: torch.Tensor,
            bias: torch.Tensor) -> dict[str, torch.Tensor]:
    """State entries of one folded conv (+ the BatchNorm after it): the folded weight on the conv, the folded
    bias on the BatchNorm (or the conv's own bias when no BatchNorm follows), the BatchNorm an identity scale."""
    conv = modules[conv_name]
    assert isinstance(conv, nn.Conv2d)
    entries = {conv_name + ".weight": weight}
    if bn_name is None:
        if conv.bias is None:
            raise OnnxWeightsError(f"ONNX gives {conv_name!r} a bias, but it has none and no BatchNorm follows")
        return {**entries, conv_name + ".bias": bias}
    bn = modules[bn_name]
    assert isinstance(bn, nn.BatchNorm2d)
    if conv.bias is not None:
        entries[conv_name + ".bias"] = torch.zeros_like(bias)
    channels = bias.shape[0]
    return {**entries, bn_name + ".weight": torch.ones(channels), bn_name + ".bias": bias,
            bn_name + ".running_mean": torch.zeros(channels),
            bn_name + ".running_var": torch.full((channels,), 1.0 - bn.eps)}


def _module_path(node_name: str) -> str:
    """'/backbone/features/features.0/conv/conv.2/Conv' -> 'backbone.features.0.conv.2': each scope segment
    ends with the child's attribute name (a Sequential child's segment is '<parent>.<index>')."""
    return ".".join(segment.split(".")[-1] for segment in node_name.strip("/").split("/")[:-1])


def _batchnorm_after_conv(model: nn.Module) -> dict[str, str]:
    """conv name -> the BatchNorm that reads its output directly (found by running the model once): the pairs
    the exporter folds."""
    outputs: dict[int, tuple[str, torch.Tensor]] = {}
    pairs: dict[str, str] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(
                lambda _m, _i, out, name=name: outputs.__setitem__(id(out), (name, out))))
        elif isinstance(module, nn.BatchNorm2d):
            hooks.append(module.register_forward_pre_hook(
                lambda _m, args, name=name: pairs.__setitem__(outputs[id(args[0])][0], name)
                if id(args[0]) in outputs else None))
    try:
        with torch.no_grad():
            first = next(m for m in model.modules() if isinstance(m, InverseDctAdapter))
            model(torch.zeros(1, first.scatter.shape[1], 14, 14))
    finally:
        for hook in hooks:
            hook.remove()
    return pairs


def _check(wanted: dict[str, torch.Tensor], state: dict[str, torch.Tensor], unused: set[str]) -> None:
    """Fail loudly: every entry present with its shape, every initializer used."""
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise OnnxWeightsError(f"{len(missing)} tensors missing from the ONNX file, e.g. {missing[:3]}")
    if unused:
        raise OnnxWeightsError(f"{len(unused)} ONNX initializers fit no tensor of the model, e.g. {sorted(unused)[:3]}")
    for name, value in wanted.items():
        if tuple(state[name].shape) != tuple(value.shape) or state[name].dtype != value.dtype:
            raise OnnxWeightsError(f"{name}: ONNX has {state[name].dtype} {tuple(state[name].shape)}, "
                                   f"the model {value.dtype} {tuple(value.shape)}")
    for name in FIXED_BY_SPEC:  # the kept channels and colour conversion: the file must serve the spec's transform
        if not torch.allclose(state[name], wanted[name], atol=1e-6):
            raise OnnxWeightsError(f"{name} differs from the transform in model.json: another transform's model")


def _ort_difference(model: FrequencyFaceModel, path: Path, spec: TransformSpec) -> float:
    """Max |ORT - PyTorch| on a fixed batch in the features' range (a structural check; the test compares on
    real faces)."""
    grid = np.arange(2 * spec.num_channels * 14 * 14, dtype=np.float64).reshape(2, spec.num_channels, 14, 14)
    features = (np.sin(grid * 0.37) * np.asarray(spec.channel_std)[None, :, None, None]).astype(np.float32)
    with torch.inference_mode():
        expected = model(torch.from_numpy(features)).numpy()
    actual = OrtEmbedder(path, prefer_gpu=False, intra_op_threads=1).embed(features)
    return float(np.max(np.abs(actual - expected)))
