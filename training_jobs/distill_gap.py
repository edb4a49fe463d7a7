"""How far a student is from its teacher on training images and on faces it never saw: the overfitting check.

    python -m training_jobs.distill_gap --checkpoint training_jobs/checkpoints/cpu-sealed-quad-w128-hint.pt [--images 600]
    python -m training_jobs.distill_gap --model-dir inference/bundled/v1-accurate   # an ONNX model version

Why: a run's own distillation loss is measured on its training views; a student that copies the teacher there but
not on new faces is short of faces, not of steps. Both sets get the same treatment: un-augmented aligned faces, one
transform-noise draw (seed 0), mean 1 - cos between the student's and the pixel teacher's embeddings. The held-out
images are those of LFW View-2 folds 6-10 (measured, never trained on). `--model-dir` measures a served gateway
model (ONNX, its own transform) the same way: how close a model that CAN be reached from these features gets.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from inference.lfw import lfw_dir, load_many, shared_dir
from inference.metadata import ModelMetadata
from inference.quantize import embeddings_fn, in_chunks
from inference.transform import TransformSpec, apply
from training_jobs.datasets import make_split
from training_jobs.evaluate import heldout_pairs
from training_jobs.teacher import Teacher
from training_jobs.students import build_student
from training_jobs.train_config import make_spec

SEED = 0  # which images and which noise draw: a measurement, not protection


def distance(student: Callable[[torch.Tensor], torch.Tensor], teacher: Teacher, faces: np.ndarray, features: np.ndarray) -> float:
    with torch.inference_mode():
        target = teacher(torch.from_numpy(faces))
        embedding = student(torch.from_numpy(features))
    assert target is not None
    return float((1 - F.cosine_similarity(embedding, target, dim=1)).mean())


def checkpoint_student(checkpoint: Path) -> tuple[Callable[[torch.Tensor], torch.Tensor], TransformSpec]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    spec = make_spec(state["config"])
    student = build_student(state["config"]["model"], spec, shared_dir())
    student.load_state_dict(state["student"])
    return student.eval(), spec


def onnx_student(model_dir: Path) -> tuple[Callable[[torch.Tensor], torch.Tensor], TransformSpec]:
    meta = ModelMetadata.load(model_dir)
    embed = embeddings_fn(Path(model_dir) / meta.onnx_file)
    return lambda features: torch.from_numpy(in_chunks(embed, features.numpy())), meta.spec


def measure(source: Path, images: int, onnx: bool = False) -> dict[str, float | int | str]:
    student, spec = onnx_student(source) if onnx else checkpoint_student(source)
    teacher = Teacher("mobilefacenet", shared_dir(), torch.device("cpu"))
    lfw, rng = lfw_dir(), np.random.default_rng(SEED)
    train = make_split(lfw).train_images
    held = sorted({path for pair in heldout_pairs(lfw) for path in (pair.left, pair.right)})
    result: dict[str, float | int | str] = {"model_dir" if onnx else "checkpoint": str(source), "images": images}
    for name, pool in (("train", train), ("heldout_folds_6_10", held)):
        picked = [pool[i] for i in rng.choice(len(pool), min(images, len(pool)), replace=False)]
        faces = load_many(lfw, picked)
        features = apply(faces, spec, rng).astype(np.float32)
        result[f"one_minus_cos_{name}"] = distance(student, teacher, faces, features)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="a training run's checkpoint")
    source.add_argument("--model-dir", type=Path, help="a model version's folder (model.json + ONNX)")
    parser.add_argument("--images", type=int, default=600, help="images drawn from each set")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    try:
        print(json.dumps(measure(args.checkpoint or args.model_dir, args.images, onnx=args.model_dir is not None)))
    except (OSError, KeyError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
