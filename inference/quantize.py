"""Make an int8 copy of a served model (ONNX Runtime static quantisation) for faster CPU inference.

    python -m inference.quantize --model inference/bundled/v1-accurate --out var/int8/v1-accurate-int8 \
        [--calibration 256] [--impostor-images 1200]

The output directory is named after the version it holds (`<source version>-int8`), so that copying it into the
model directory never overwrites the float version's directory (docs/operations.md).

Why static QDQ int8 and only the backbone's body: dynamic quantisation turns every Conv into ConvInteger,
which ORT runs several times slower than float on this CPU and which drifts far from the float embeddings
(measured: cosine 0.65 on average). Static quantisation with per-channel weights runs the body's 1x1 and
depthwise convolutions with int8 kernels (AVX-512 VNNI here). The DCT adapter (its inputs span four orders of
magnitude), the stem convolution and the embedding head (conv2, the global depthwise conv, the last linear
conv, the L2 norm) stay float: quantising them too cost cosine 0.98 instead of 0.997 to the float embedding.

Calibration uses noisy features of LFW identities in no View-2 fold only (never folds 6-10, which are for
evaluation). The output directory gets model.onnx and a copy of the source's model.json with the int8 file's
checksum, its own served threshold and impostor curve (inference.operating_points.calibrate on the same
calibration identities, as inference.export does); its accuracy must be measured on held-out pairs before it
is served (docs/operations.md).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from inference.export import VERIFY_FAR
from inference.lfw import images_outside_pairs, lfw_dir, load_many
from inference.metadata import ModelMetadata, file_sha256
from inference.operating_points import CALIBRATION_IMAGES, calibrate
from inference.runtime import OrtEmbedder
from inference.transform import TransformSpec, apply

QUANTISED_PREFIXES = ("/backbone/dw_conv/", "/backbone/features/")  # the body; everything else stays float
BATCH = 16  # calibration photos per reader batch
RANGE_CHUNK = 5  # activation ranges merged every 5 batches (80 photos): about 2 GB instead of 4


class _Batches:
    """onnxruntime's CalibrationDataReader protocol (only get_next is called; the class is untyped, so not
    subclassed)."""

    def __init__(self, input_name: str, features: np.ndarray, batch: int = BATCH) -> None:
        self._items = iter([{input_name: features[i:i + batch]} for i in range(0, len(features), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)


def calibration_features(meta: ModelMetadata, count: int, seed: int) -> np.ndarray:
    """Noisy served-transform features of `count` photos of identities in no View-2 fold."""
    lfw = lfw_dir()
    images = images_outside_pairs(lfw)
    rng = np.random.default_rng(seed)
    chosen = [images[i] for i in rng.choice(len(images), min(count, len(images)), replace=False)]
    return apply(load_many(lfw, chosen), TransformSpec.from_dict(meta.transform), rng).astype(np.float32)


def in_chunks(embed: Callable[[np.ndarray], np.ndarray], features: np.ndarray, size: int = 32) -> np.ndarray:
    return np.concatenate([embed(features[i:i + size]) for i in range(0, len(features), size)])


def embeddings_fn(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """One-thread ORT embedding function of an ONNX file (float or int8)."""
    embed: Callable[[np.ndarray], np.ndarray] = OrtEmbedder(path, prefer_gpu=False, intra_op_threads=1).embed
    return embed


def range_chunk(photos: int) -> int:
    """Batches per merge of the activation ranges: RANGE_CHUNK, or the next size that does not divide the batch
    count, since ORT 1.32 raises "No data is collected" when the last chunk is empty (e.g. 80 photos, 5 batches)."""
    batches = -(-photos // BATCH)
    chunk = RANGE_CHUNK
    while batches % chunk == 0:
        chunk += 1
    return chunk


def float_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes that stay float: every node outside QUANTISED_PREFIXES."""
    return [node.name for node in model.graph.node if not node.name.startswith(QUANTISED_PREFIXES)]


def quantize(model_dir: Path, out_dir: Path, calibration: int = 256, seed: int = 0,
             impostor_images: int = CALIBRATION_IMAGES) -> Path:
    """Write out_dir/model.onnx (int8 body) and out_dir/model.json; returns the ONNX path. `impostor_images`
    (photos for the served threshold's impostor curve) is smaller only in tests, to keep them cheap."""
    meta = ModelMetadata.load(model_dir)
    source = model_dir / meta.onnx_file
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / meta.onnx_file
    features = calibration_features(meta, calibration, seed)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared))  # shape inference + float graph clean-up first
        input_name = onnx.load(str(prepared)).graph.input[0].name
        quantize_static(str(prepared), str(target), _Batches(input_name, features), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=float_nodes(onnx.load(str(prepared))),
                        extra_options={"CalibMaxIntermediateOutputs": range_chunk(len(features))})
    float_embeddings = in_chunks(embeddings_fn(source), features)  # chunks: a 256-batch needs GBs
    int8_embeddings = in_chunks(embeddings_fn(target), features)
    cosines = np.sum(float_embeddings * int8_embeddings, axis=1) / (
        np.linalg.norm(float_embeddings, axis=1) * np.linalg.norm(int8_embeddings, axis=1))
    description = json.loads((model_dir / "model.json").read_text())
    metrics = {key: value for key, value in description["metrics"].items() if key != "heldout"}  # not this file's
    metrics["quantized"] = {
        "from_sha256": meta.sha256,
        "method": f"ORT static QDQ, per-channel int8 weights, uint8 activations, only {', '.join(QUANTISED_PREFIXES)}",
        "calibration": f"{len(features)} photos of identities in no View-2 fold, seed {seed}",
        "cosine_to_float_on_calibration": {"min": round(float(cosines.min()), 4),
                                           "mean": round(float(cosines.mean()), 4)},
        "heldout": "not in this file: measure with python -m training_jobs.evaluate (docs/operations.md)"}
    # the served threshold is the int8 model's own, chosen as export does: on the calibration impostors
    curve = calibrate(embeddings_fn(target), TransformSpec.from_dict(meta.transform), lfw_dir(), impostor_images)
    metrics["served_threshold"] = f"false-match rate {VERIFY_FAR:g} on the calibration impostors (int8 embeddings)"
    description.update({"sha256": file_sha256(target), "version": f"{meta.version}-int8", "metrics": metrics,
                        "threshold": float(curve.threshold(VERIFY_FAR)), "impostor_curve": curve.to_dict()})
    (out_dir / "model.json").write_text(json.dumps(description, indent=1, sort_keys=True) + "\n")
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a model version directory (model.json + ONNX)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--calibration", type=int, default=256, help="photos used to calibrate the activations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--impostor-images", type=int, default=CALIBRATION_IMAGES,
                        help="photos for the served threshold's impostor curve (fewer only for tests)")
    args = parser.parse_args(argv)
    print(quantize(args.model, args.out, args.calibration, args.seed, args.impostor_images))


if __name__ == "__main__":
    main()
