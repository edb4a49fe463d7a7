"""Export a model version to ONNX, check it against PyTorch, measure it, and write its model.json.

    python -m inference.export --version v0 --out-dir var/models [--eval-pairs 600]

Produces OUT_DIR/<version>/model.onnx and model.json (see inference.metadata). The directory appears
atomically (built under a temporary name, then renamed), so a crashed export never looks complete.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from inference.evaluation import verify_fold
from inference.frequency_model import FrequencyFaceModel, build_model_v0
from inference.lfw import fold_pairs, lfw_dir, load_many, shared_dir
from inference.operating_points import CALIBRATION_IMAGES, calibrate

VERIFY_FAR = 1e-3  # served 1:1 threshold of a trained model: this false-match rate on the calibration impostors
from inference.metadata import ModelMetadata, file_sha256
from inference.mobilefacenet import EMBEDDING_DIM
from inference.onnx_weights import OnnxWeightsError, model_from_onnx
from inference.runtime import OrtEmbedder
from inference.transform import TransformSpec, apply, default_spec

ONNX_FILE = "model.onnx"
WEIGHTS_FILE = "weights.pt"  # the PyTorch state dict (parameters and BatchNorm statistics), ~4 MB
OPSET = 17
MAX_PARITY_DIFF = 1e-3
# The served threshold is chosen on fold 2; fold 1 stays unseen for the end-to-end test from raw photos.
EVAL_FOLD = 2
PROTOCOL = ("LFW aligned 112, pairs.txt fold {fold} ({pairs} pairs); each image transformed once with its own "
            "noise draw (seed 0); cosine of L2-normalised embeddings; accuracy = mean over 10 interleaved "
            "parts of the pairs, threshold chosen on the other 9; served threshold = best on all of them, "
            "with the served (noisy) transform.")


def build(version: str, shared: Path) -> tuple[FrequencyFaceModel, TransformSpec]:
    """The PyTorch model and the transform it serves, for each version this module knows how to make."""
    if version == "v0":
        spec = default_spec()
        return build_model_v0(spec, shared), spec
    raise ValueError(f"don't know how to build model version {version!r}")


def export_onnx(model: torch.nn.Module, spec: TransformSpec, path: Path) -> None:
    """ONNX opset 17 (TorchScript exporter), input "features" [N,K,14,14], output "embedding" [N,d]."""
    example = torch.zeros(2, *spec.shape)
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated but is what dynamo=False asks for
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(model, (example,), str(path), input_names=["features"], output_names=["embedding"],
                          dynamic_axes={"features": {0: "N"}, "embedding": {0: "N"}}, opset_version=OPSET,
                          dynamo=False)
    declare_output_shape(path, EMBEDDING_DIM)


def declare_output_shape(path: Path, dim: int) -> None:
    """Write the output shape as ["N", dim]: the exporter leaves a symbolic name after the L2 norm."""
    graph = onnx.load(str(path))
    dims = graph.graph.output[0].type.tensor_type.shape.dim
    dims[0].dim_param = "N"
    dims[1].dim_value = dim
    onnx.checker.check_model(graph)
    onnx.save(graph, str(path))


def sample_features(shared: Path, spec: TransformSpec, count: int = 8, seed: int = 0) -> np.ndarray:
    """Real noisy features of the first fold-1 images, float32 [count, K, 14, 14]."""
    lfw = lfw_dir(shared)
    images = [pair.left for pair in fold_pairs(lfw, EVAL_FOLD)[:count]]
    return apply(load_many(lfw, images), spec, np.random.default_rng(seed)).astype(np.float32)


def parity(model: torch.nn.Module, embedder: OrtEmbedder, features: np.ndarray) -> float:
    """Max |ORT - PyTorch| over the embeddings of `features`."""
    with torch.inference_mode():
        expected = model(torch.from_numpy(features)).numpy()
    return float(np.max(np.abs(embedder.embed(features) - expected)))


def measure(embedder: OrtEmbedder, spec: TransformSpec, shared: Path, eval_pairs: int) -> tuple[dict, float]:
    """Fold-1 metrics without noise and with the served noise; returns (metrics, served threshold)."""
    lfw = lfw_dir(shared)
    clean = verify_fold(lfw, EVAL_FOLD, spec.with_epsilon(None), embedder.embed, eval_pairs)
    noisy = verify_fold(lfw, EVAL_FOLD, spec, embedder.embed, eval_pairs)
    metrics = {"protocol": PROTOCOL.format(fold=EVAL_FOLD, pairs=noisy.num_pairs),
               f"lfw_fold{EVAL_FOLD}_no_noise": clean.to_dict(),
               f"lfw_fold{EVAL_FOLD}_served_noise": {**noisy.to_dict(), "transform_id": spec.transform_id}}
    return metrics, noisy.threshold


def export_version(version: str, out_dir: Path, shared: Path, eval_pairs: int = 600) -> Path:
    """Build, export, check and measure `version`; returns OUT_DIR/<version>. Replaces an existing one."""
    model, spec = build(version, shared)

    def measured(embedder: OrtEmbedder) -> tuple[float, dict]:
        metrics, threshold = measure(embedder, spec, shared, eval_pairs)
        return threshold, metrics

    return _export_atomically(model, spec, version, Path(out_dir), shared, measured)


def export_model_version(model: torch.nn.Module, spec: TransformSpec, version: str, out_dir: Path,
                         shared: Path, threshold: float | None, metrics: dict,
                         calibration_images: int = CALIBRATION_IMAGES, calibration_faces: Path | None = None) -> Path:
    """Export an already-built (e.g. trained) model as OUT_DIR/<version>: ONNX, ORT-vs-PyTorch parity, model.json.

    Unlike export_version, the caller supplies the metrics (a trained model must be measured on identities it never
    saw, which only the caller knows). ``threshold`` None: the served threshold is the one at false-match rate
    VERIFY_FAR on the calibration impostors (people in no View-2 fold), so nothing is tuned on held-out pairs.
    Same atomic directory swap. ``calibration_images``: how many such images the impostor curve is measured on
    (fewer: a faster export and a coarser curve at low false-match rates; model.json's curve says how many).
    ``calibration_faces``: a face folder of people the model never trained on to calibrate on instead of LFW's
    no-fold people, who are training people of every model trained here (inference.operating_points.calibrate).
    """
    return _export_atomically(model.cpu().eval(), spec, version, Path(out_dir), shared,
                              lambda _embedder: (threshold, metrics), calibration_images, calibration_faces)


def _export_atomically(model: torch.nn.Module, spec: TransformSpec, version: str, out_dir: Path, shared: Path,
                       threshold_and_metrics, calibration_images: int = CALIBRATION_IMAGES,
                       calibration_faces: Path | None = None) -> Path:
    """ONNX export + parity check + model.json, built under a temporary name and renamed into place, so a
    crashed export never looks complete. `threshold_and_metrics(embedder) -> (threshold, metrics)`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=out_dir))
    try:
        onnx_path = staging / ONNX_FILE
        export_onnx(model, spec, onnx_path)
        weights = save_weights(model, staging / WEIGHTS_FILE)
        embedder = OrtEmbedder(onnx_path, prefer_gpu=False, intra_op_threads=torch.get_num_threads())
        diff = parity(model, embedder, sample_features(shared, spec))
        if not diff <= MAX_PARITY_DIFF:
            raise RuntimeError(f"ONNX Runtime and PyTorch disagree by {diff:.3g} (limit {MAX_PARITY_DIFF})")
        threshold, metrics = threshold_and_metrics(embedder)
        curve = calibrate(embedder.embed, spec, lfw_dir(shared), calibration_images, unseen=calibration_faces)
        if threshold is None:
            threshold = curve.threshold(VERIFY_FAR)
            metrics = {**metrics, "served_threshold": f"false-match rate {VERIFY_FAR:g} on the calibration impostors"}
        ModelMetadata(version=version, transform=spec.to_dict(), transform_id=spec.transform_id,
                      params_hash=spec.params_hash, embedding_dim=EMBEDDING_DIM, sha256=file_sha256(onnx_path),
                      onnx_file=ONNX_FILE, ort_vs_torch_max_abs_diff=diff, threshold=float(threshold),
                      metrics=metrics, impostor_curve=curve.to_dict(), weights=weights).save(staging)
        return publish_staging(staging, out_dir, version)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish_staging(staging: Path, out_dir: Path, version: str) -> Path:
    """Rename a complete staging folder into OUT_DIR/<version>, replacing an older one, so a reader never sees a
    half-written version; mkdtemp made it private, the served directory is world-readable."""
    staging.chmod(0o755)
    final = out_dir / version
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    return final


def architecture(model: torch.nn.Module) -> str:
    """What a state dict fits: the model class and, for a FrequencyFaceModel, its adapter and backbone classes."""
    parts = [type(model).__name__] + [type(getattr(model, name)).__name__ for name in ("adapter", "backbone")
                                      if isinstance(getattr(model, name, None), torch.nn.Module)]
    return "/".join(parts)


def save_weights(model: torch.nn.Module, path: Path) -> dict:
    """Write the model's state dict beside its ONNX file; returns model.json's `weights` entry.

    Why: ONNX is what serves, but training (a federated job that continues from the active version) needs the
    PyTorch parameters and BatchNorm statistics, which the ONNX graph holds only folded and renamed."""
    torch.save({name: value.detach().cpu() for name, value in model.state_dict().items()}, path)
    return {"file": path.name, "sha256": file_sha256(path), "architecture": architecture(model)}


# The architecture federated rounds and training_jobs.train fine-tune (learnable inverse DCT + MobileFaceNet), and
# the same with the adapter's block-context convolutions (inference/frequency_model.py::BlockContextAdapter).
FREQUENCY_ARCHITECTURE = "FrequencyFaceModel/InverseDctAdapter/MobileFaceNet"
CONTEXT_ARCHITECTURE = "FrequencyFaceModel/BlockContextAdapter/MobileFaceNet"


class WeightsError(ValueError):
    """A model version's PyTorch weights cannot be trained from (absent, damaged or another architecture)."""


def saved_weights(version_dir: Path) -> tuple[Path, str] | None:
    """(weights file, sha256) of a model version that training can start from; None for the served v0, whose
    weights are the pretrained network behind the exact inverse DCT (rebuilt, not stored). A version shipped as
    ONNX only (the bundled v1 models) gives its ONNX file and checksum when inference.onnx_weights can rebuild
    the PyTorch model from it (training_jobs.federated.params.load_weights then does). Raises WeightsError for
    a version trained with another architecture or whose ONNX file is absent or cannot be rebuilt."""
    meta = ModelMetadata.load(version_dir, verify=False)
    if meta.weights:
        if meta.weights.get("architecture") not in (FREQUENCY_ARCHITECTURE, CONTEXT_ARCHITECTURE):
            raise WeightsError(f"model version {meta.version} is a {meta.weights.get('architecture')}, "
                               f"not a {FREQUENCY_ARCHITECTURE} (or with a BlockContextAdapter)")
        path = Path(version_dir) / str(meta.weights["file"])
        if not path.is_file():  # refused when a job is created, not rounds later in the federated run
            raise WeightsError(f"model version {meta.version} names PyTorch weights {meta.weights['file']} that "
                               "are not beside its model.json")
        return path, str(meta.weights["sha256"])
    if meta.version == "v0":
        return None
    onnx_path = Path(version_dir) / meta.onnx_file
    try:
        if file_sha256(onnx_path) != meta.sha256:
            raise OnnxWeightsError(f"{meta.onnx_file} does not match its recorded sha256")
        model_from_onnx(onnx_path, meta.spec)
    except (OnnxWeightsError, OSError) as exc:
        raise WeightsError(f"model version {meta.version} has no PyTorch weights and its ONNX file cannot be "
                           f"rebuilt into them: {exc}") from None
    return onnx_path, meta.sha256


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", default="v0")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--shared-dir", type=Path, default=None)
    parser.add_argument("--eval-pairs", type=int, default=600, help="fold-1 pairs to measure (600 = all)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    final = export_version(args.version, args.out_dir, args.shared_dir or shared_dir(), args.eval_pairs)
    meta = ModelMetadata.load(final)
    print(f"exported {final}: {meta.transform_id} {meta.params_hash}, ORT vs torch {meta.ort_vs_torch_max_abs_diff:.2e}")
    for name, value in meta.metrics.items():
        print(f"  {name}: {value}")


if __name__ == "__main__":
    main()
