"""Build a served sealed-mode model (issue 12) from a training checkpoint of ``inference/sealed_student.py``.

    python -m inference.sealed_export --checkpoint var/training/cpu-sealed-quad/checkpoints/last.pt \
        --version sealed-v1 --out-dir inference/bundled

Writes OUT_DIR/<version>/ with two files (built under a temporary name and renamed, so a crash never leaves a
half model):
* ``layers.npz``: the student with every BatchNorm folded (``folded_layers``), float32 arrays named ``<i>.<field>``;
  what each party's MPC worker evaluates on shares (``secure/party/sealed.py`` reads it).
* ``sealed.json``: the layer list without its arrays, the sha256 of ``layers.npz``, the transform the SDK must
  apply, the embedding size, the norm scale the MPC's inverse square root starts from (median raw-embedding norm
  on training images), and the served threshold: the false-match rate ``VERIFY_FAR`` on impostor pairs of LFW
  people in NO View-2 fold (``inference.operating_points.calibrate``, as ``inference/export.py`` does for the
  gateway's model), with the impostor curve. Nothing is tuned on folds 6-10.
* ``flip_signs`` in sealed.json (unless ``--no-test-time-flip``): the parties embed e(x) + e(flip x)
  (``inference.sealed_student.flip_planes``); norm scale and threshold are the flipped twin's. Chosen on the CelebA
  validation set (training_jobs.validation_set), not on LFW: +1.8 points [+1.1, +2.5] for sealed-v4's weights.

The file is not named model.json on purpose: the gateway's bundled-model installer takes every model.json
directory for an ONNX model, and this one is not.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.paths import PROJECT_ROOT
from inference.export import VERIFY_FAR, publish_staging
from inference.lfw import images_outside_pairs, lfw_dir, load_many, shared_dir
from inference.operating_points import calibrate
from inference.sealed_student import SealedCnn, SealedFaceModel, depth_of, flip_signs, folded_layers, head_of
from inference.transform import TransformSpec, apply

SEALED_FILE = "sealed.json"
LAYERS_FILE = "layers.npz"
NORM_IMAGES = 64  # training images (people in no View-2 fold) whose median raw norm scales the MPC's inv sqrt


def load_checkpoint(path: Path) -> tuple[SealedFaceModel, TransformSpec, dict[str, Any]]:
    """The student of any sealed-cnn checkpoint (width, depth and embedding size read from the weights), its
    transform, and what the checkpoint says about itself."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    weights = state["student"]
    model_cfg = state.get("config", {}).get("model", {})
    if model_cfg.get("kind", "sealed-cnn") != "sealed-cnn":
        raise ValueError(f"{path} is a {model_cfg.get('kind')} checkpoint, not a sealed-cnn one")
    spec = TransformSpec.from_dict(state["transform"])
    width = int(weights["backbone.features.0.0.weight"].shape[0])
    embedding = int(weights["backbone.embed.weight"].shape[0])
    depth, head = depth_of(weights), head_of(weights)
    cnn = SealedCnn(spec.num_channels, str(model_cfg.get("activation", "quad")), width, embedding, depth, head)
    model = SealedFaceModel(cnn)
    model.load_state_dict(weights)
    source = {"checkpoint": portable_path(path), "checkpoint_sha256": file_sha256(path), "run": state.get("config", {}).get("name"), "epoch": state.get("epoch"),
              "activation": model_cfg.get("activation", "quad"), "width": width, "embedding_dim": embedding,
              **({"depth": depth} if depth != 2 else {}), **({"head": head} if head != "dense" else {})}
    return model.eval(), spec, source


def portable_path(path: Path) -> str:
    """``path`` as the bundle records it: relative to the project (the bundle is committed and read on other
    machines, where an absolute path of the build machine means nothing), else its last three parts."""
    resolved = path.resolve()
    if resolved.is_relative_to(PROJECT_ROOT):
        return resolved.relative_to(PROJECT_ROOT).as_posix()
    return "/".join(resolved.parts[-3:])


def file_sha256(path: Path) -> str:
    """What identifies the checkpoint wherever it is copied (the path alone does not)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_layers(layers: list[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    """Arrays into ``path`` (float32, ``<i>.<field>``); returns the layer list with each array replaced by its
    field name, as sealed.json records it."""
    arrays: dict[str, Any] = {}  # Any: numpy's stub types savez's keyword arguments as its allow_pickle flag
    described = []
    for i, layer in enumerate(layers):
        entry: dict[str, Any] = {}
        for key, value in layer.items():
            if isinstance(value, np.ndarray):
                arrays[f"{i}.{key}"] = value.astype(np.float32)
                entry.setdefault("arrays", []).append(key)
            else:
                entry[key] = value
        described.append(entry)
    with path.open("wb") as handle:
        np.savez_compressed(handle, **arrays)
    return described


def norm_hint(model: SealedFaceModel, spec: TransformSpec, lfw: Path) -> float:
    """Median raw-embedding norm of the twin on ``NORM_IMAGES`` training images (one noise draw, seed 0)."""
    images = images_outside_pairs(lfw)[::100][:NORM_IMAGES]
    features = apply(load_many(lfw, images), spec, np.random.default_rng(0)).astype(np.float32)
    with torch.inference_mode():
        raw = model.raw(torch.from_numpy(features)).double().numpy()
    return float(np.median(np.linalg.norm(raw, axis=1)))


def twin_embed(model: SealedFaceModel) -> Any:
    def embed(features: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out: np.ndarray = model(torch.from_numpy(np.asarray(features, dtype=np.float32))).double().numpy()
        return out
    return embed


def build_sealed(checkpoint: Path, version: str, out_dir: Path, shared: Path, far: float = VERIFY_FAR,
                 test_time_flip: bool = True, unseen: Path | None = None) -> Path:
    """OUT_DIR/<version> from ``checkpoint``; replaces an existing one. ``unseen``: calibrate the threshold on this
    face folder's people, none of them trained on (inference.operating_points.calibrate), not on LFW's."""
    model, spec, source = load_checkpoint(checkpoint)
    model.flip = flip_signs(spec) if test_time_flip else None
    lfw = lfw_dir(shared)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=out_dir))
    try:
        layers = save_layers(folded_layers(model), staging / LAYERS_FILE)
        curve = calibrate(twin_embed(model), spec, lfw, unseen=unseen)  # never a View-2 fold's people
        meta = {"version": version, "kind": "sealed-student", "transform": spec.to_dict(),
                "transform_id": spec.transform_id, "params_hash": spec.params_hash, "shape": list(spec.shape),
                "embedding_dim": source["embedding_dim"], "layers": layers, "layers_file": LAYERS_FILE,
                "flip_signs": model.flip,
                "layers_sha256": hashlib.sha256((staging / LAYERS_FILE).read_bytes()).hexdigest(),
                "norm_hint": norm_hint(model, spec, lfw),
                "norm_hint_source": f"median raw-embedding norm of {NORM_IMAGES} LFW images outside View 2",
                "threshold": float(curve.threshold(far)),
                "threshold_source": f"false-match rate {far:g} on the calibration impostors ({curve.source})",
                "impostor_curve": curve.to_dict(), "source": source, "metrics": checkpoint_metrics(checkpoint)}
        (staging / SEALED_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        return publish_staging(staging, out_dir, version)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def checkpoint_metrics(checkpoint: Path) -> dict[str, Any]:
    """The run's own held-out figure (its final.json beside checkpoints/, LFW folds 6-10), if it wrote one."""
    final = checkpoint.resolve().parent.parent / "final.json"
    try:
        verification = json.loads(final.read_text())["verification"]
    except (OSError, ValueError, KeyError):
        return {}
    return {"twin_accuracy_folds_6_10": verification.get("accuracy"),
            "twin_accuracy_std": verification.get("accuracy_std"), "from": portable_path(final)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--version", required=True, help="e.g. sealed-v1")
    parser.add_argument("--out-dir", type=Path, default=Path("inference/bundled"))
    parser.add_argument("--shared-dir", type=Path, default=None)
    parser.add_argument("--far", type=float, default=VERIFY_FAR, help="served false-match rate (calibration set)")
    parser.add_argument("--no-test-time-flip", action="store_true", help="embed e(x) only (half the MPC bytes)")
    parser.add_argument("--calibration-faces", type=Path, default=None,
                        help="face folder laid out as LFW whose people the model never trained on (e.g. the CelebA "
                             "validation set); default: LFW people in no View-2 fold, who are training people")
    args = parser.parse_args(argv)
    if args.calibration_faces is not None and not args.calibration_faces.is_dir():
        parser.error(f"--calibration-faces {args.calibration_faces}: not a folder")
    torch.set_num_threads(1)
    final = build_sealed(args.checkpoint, args.version, args.out_dir, args.shared_dir or shared_dir(), args.far,
                         test_time_flip=not args.no_test_time_flip, unseen=args.calibration_faces)
    meta = json.loads((final / SEALED_FILE).read_text())
    print(f"built {final}: {meta['transform_id']}, d={meta['embedding_dim']}, threshold {meta['threshold']:.4f}, "
          f"norm scale {meta['norm_hint']:.3f}, test-time flip {'on' if meta['flip_signs'] else 'off'}")


if __name__ == "__main__":
    main()
