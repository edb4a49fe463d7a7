"""The network a training run trains (`model:` in its config): the served frequency-mobilefacenet family or the
sealed-mode CNN, optionally started from a served ONNX model (`model.init_onnx`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from inference.frequency_model import BlockContextAdapter, FrequencyFaceModel, InverseDctAdapter
from inference.metadata import ModelMetadata
from inference.mobilefacenet import load_pretrained
from inference.onnx_weights import FIXED_BY_SPEC, state_dict_from_onnx
from inference.sealed_student import SealedCnn, SealedFaceModel
from inference.transform import TransformSpec

# what build_student makes: both have .adapter and .backbone and map features to a unit embedding
Student = FrequencyFaceModel | SealedFaceModel


def build_student(model: dict[str, Any], spec: TransformSpec, shared: Path) -> Student:
    """`kind: frequency-mobilefacenet` (default): learnable inverse-DCT adapter + pretrained MobileFaceNet, the
    served architecture, started from the pixel network or (`init_onnx`) from a served version's weights;
    `context_width: W` adds the adapter's block-context convolutions (W channels, inference/frequency_model.py).
    `kind: sealed-cnn`: the small CNN on the DCT planes made for MPC (issue 12), trained from scratch,
    `activation: relu | quad`, `width` channels, `depth` blocks per stage, `head: dense | gdc`."""
    kind = model.get("kind", "frequency-mobilefacenet")
    if kind == "frequency-mobilefacenet":
        width = int(model.get("context_width", 0))
        adapter = BlockContextAdapter(spec, width, model["adapter_learnable"]) if width \
            else InverseDctAdapter(spec, learnable=model["adapter_learnable"])
        student = FrequencyFaceModel(adapter, load_pretrained(shared))
        if model.get("init_onnx"):
            load_served_onnx(student, Path(model["init_onnx"]))
        return student
    if kind == "sealed-cnn":
        return SealedFaceModel(SealedCnn(spec.num_channels, model.get("activation", "quad"), int(model.get("width", 128)),
                                         depth=int(model.get("depth", 2)), head=model.get("head", "dense")))
    raise ValueError(f"model.kind must be frequency-mobilefacenet or sealed-cnn, not {kind!r}")


def load_served_onnx(student: FrequencyFaceModel, path: Path) -> None:
    """Start `student` from a served model version's ONNX file (model.json beside it names its transform).

    Why: the bundled v1 models were trained on a lent GPU and kept as ONNX only; a model for another transform
    of the same family (fewer low frequencies, say) starts far better from one of them than from the pixel
    teacher. The adapter's 192x192 map does not depend on which channels a transform keeps: only the fixed
    scatter does, and it stays the student's own. BatchNorms come back as identity scales (inference/
    onnx_weights.py), exact in eval mode: train such a student with `freeze_backbone_bn: true`.
    """
    served = state_dict_from_onnx(path, ModelMetadata.load(Path(path).parent, verify=False).spec)
    own = student.state_dict()
    foreign = sorted(set(served) - set(own))
    if foreign:
        raise ValueError(f"{path}: {foreign[0]} has no place in this student (another architecture)")
    # a BlockContextAdapter's context is not in the served file: it keeps its zero start, the same function
    student.load_state_dict({**own, **{name: value for name, value in served.items() if name not in FIXED_BY_SPEC}})
