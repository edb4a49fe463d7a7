"""Held-out evaluation of face models on LFW folds 6–10: the same code for frequency models and pixel teachers.

    python -m training_jobs.evaluate --model var/models-h5/v0/model.onnx --model pixel-mobilefacenet --model sface \
        --transform dct8-v0 --folds 6-10 [--epsilon 64] [--out docs/models/eval] [--name-suffix ...]
    python -m training_jobs.evaluate --model var/models-h5/v0/model.onnx --transform dct8-v0 --folds 6-10 \
        --epsilons none,256,64,32,16 --out docs/models/eval-eps   # accuracy-vs-ε plot

The protocol (every model, same pairs, same images) is `PROTOCOL` below; every report carries it.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from inference.evaluation import best_threshold
from inference.lfw import Pair, lfw_dir, load_many, read_pairs, shared_dir
from inference.mobilefacenet import IMAGENET_MEAN, IMAGENET_STD, load_pretrained
from inference.transform import PRESETS, TransformSpec, apply
from training_jobs.eval_metrics import leave_one_fold_out_accuracy, rank1, tar_at_far
from training_jobs.eval_report import markdown_table, plot_accuracy_vs_epsilon, plot_roc_det

FaceEmbedFn = Callable[[np.ndarray], np.ndarray]  # RGB uint8 [B, 112, 112, 3] -> [B, d]
DEFAULT_FOLDS = (6, 7, 8, 9, 10)
PIXEL_MODELS = ("pixel-mobilefacenet", "sface")
# What every report states about how it was measured (results.json "protocol"); data, not this module's docstring.
PROTOCOL = """(every model, same pairs, same images):
- pairs: every pair of the chosen pairs.txt folds (600 per fold); each image embedded once. A frequency model sees
  the SDK's exact transform (`TransformSpec.apply`, one noise draw per image, seeded); a pixel model sees the clean
  aligned face. Score = cosine of L2-normalised embeddings (each model embeds face + flipped face).
- accuracy: leave-one-fold-out over the chosen folds (threshold maximising accuracy on the other folds, applied
  to the held-out fold), mean ± std over folds.
- TAR at FAR 1e-3 / 1e-4 over all chosen pairs: threshold = the lowest score that keeps the impostor accept
  rate at or below the target. With 1,500 impostor pairs (folds 6–10) FAR 1e-3 allows one false accept and
  FAR 1e-4 allows none, so these are coarse; `far_resolution` is reported beside them.
- 1:N rank-1 on the held-out identities: the images of the chosen folds' pairs; identities with at least two of
  them; gallery = the first image (sorted by name) of each such identity; probes = the rest.
- ROC (TAR vs FAR, log axis) and DET (FNMR vs FMR on normal-deviate axes) plots, one curve per model."""


# ------------------------------------------------------------------------------------------------
# Held-out identities and pairs

def parse_folds(text: str) -> tuple[int, ...]:
    folds: list[int] = []
    for part in text.split(","):
        if "-" in part:
            low, high = part.split("-")
            folds.extend(range(int(low), int(high) + 1))
        else:
            folds.append(int(part))
    return tuple(sorted(set(folds)))


def heldout_pairs(lfw: Path, folds: tuple[int, ...] = DEFAULT_FOLDS) -> list[Pair]:
    return [p for p in read_pairs(lfw) if p.fold in folds]


def identification_split(images: list[str]) -> tuple[list[str], list[str]]:
    """(gallery, probes): identities with >= 2 of `images`; first image (sorted) in the gallery, rest probes."""
    by_id: dict[str, list[str]] = defaultdict(list)
    for path in sorted(images):
        by_id[path.split("/")[0]].append(path)
    gallery, probes = [], []
    for paths in by_id.values():
        if len(paths) >= 2:
            gallery.append(paths[0])
            probes.extend(paths[1:])
    return gallery, probes


def identity(path: str) -> str:
    return path.split("/")[0]


# ------------------------------------------------------------------------------------------------
# Embedders: every one takes clean aligned RGB faces; frequency models apply the SDK transform themselves.

def pixel_input(faces_rgb: np.ndarray) -> torch.Tensor:
    """RGB uint8 [B,112,112,3] (numpy or tensor) -> MobileFaceNet input (RGB/255, ImageNet mean/std) [B,3,112,112]."""
    x = torch.as_tensor(np.asarray(faces_rgb), dtype=torch.float32).permute(0, 3, 1, 2) / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def flip_embed(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    both = model(torch.cat([x, torch.flip(x, dims=[3])], dim=0))
    return torch.nn.functional.normalize(both[: len(x)] + both[len(x):], dim=1)


def pixel_mobilefacenet_embedder(shared: Path) -> FaceEmbedFn:
    model = load_pretrained(shared)

    def embed(faces: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return flip_embed(model, pixel_input(faces)).numpy()
    return embed


def sface_embedder(threads: int = 1) -> FaceEmbedFn:
    from training_jobs.sface import SFaceEmbedder
    return SFaceEmbedder(threads=threads).embed


def frequency_embedder(features_fn: Callable[[np.ndarray], np.ndarray], spec: TransformSpec,
                       rng: np.random.Generator) -> FaceEmbedFn:
    """Transform each face once (one fresh noise draw from `rng`), then embed the features."""
    def embed(faces: np.ndarray) -> np.ndarray:
        return features_fn(apply(faces, spec, rng).astype(np.float32))
    return embed


def torch_features_fn(model: torch.nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    device = next(model.parameters()).device

    def run(features: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            result: np.ndarray = model(torch.from_numpy(features).to(device)).float().cpu().numpy()
            return result
    return run


def onnx_features_fn(path: Path, threads: int = 1) -> Callable[[np.ndarray], np.ndarray]:
    from inference.runtime import OrtEmbedder
    return OrtEmbedder(path, prefer_gpu=True, intra_op_threads=threads).embed


# ------------------------------------------------------------------------------------------------

@dataclass
class ModelResult:
    name: str
    input: str  # "pixels" or a transform_id
    verification: dict[str, Any]
    tar_at_far: dict[str, Any]
    rank1: float
    num_pairs: int
    num_gallery: int
    num_probes: int
    seconds: float
    scores: np.ndarray = field(repr=False)  # every pair's score and truth, for the ROC/DET plots
    same: np.ndarray = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "input": self.input, "verification": self.verification,
                "tar_at_far": self.tar_at_far, "rank1": self.rank1, "num_pairs": self.num_pairs,
                "num_gallery": self.num_gallery, "num_probes": self.num_probes, "seconds": round(self.seconds, 1)}


def embed_all(faces: np.ndarray, embed: FaceEmbedFn, batch: int = 64, progress: bool = False) -> np.ndarray:
    chunks = range(0, len(faces), batch)
    if progress:
        from tqdm import tqdm
        chunks = tqdm(chunks, desc="embed", unit="batch", leave=False)
    out = [embed(faces[start:start + batch]) for start in chunks]
    vectors = np.concatenate(out).astype(np.float64)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    bad = int((~np.isfinite(norms) | (norms == 0)).sum())
    if bad:
        raise NonFiniteEmbeddings(f"{bad} of {len(vectors)} embeddings are not finite or zero: a diverged model, or "
                                  "BatchNorm statistics never calibrated (an untrained deep quadratic student)")
    result: np.ndarray = vectors / norms
    return result


class NonFiniteEmbeddings(ValueError):
    """The model under evaluation gave inf/NaN (or zero) embeddings, which no score can be computed from."""


def baseline(evaluate: Callable[[], ModelResult]) -> dict[str, Any]:
    """An untrained model's held-out figures, or why there are none. Why: quadratic activations square whatever
    the default BatchNorm statistics (mean 0, variance 1) let through; six such layers overflow float32 before the
    first training step, and that must not stop the run it is only a reference point for."""
    try:
        return evaluate().to_dict()
    except NonFiniteEmbeddings as exc:
        return {"skipped": str(exc)}


class HeldoutSet:
    """Pairs of the chosen folds, their images loaded once, and the identification split."""

    def __init__(self, lfw: Path, folds: tuple[int, ...] = DEFAULT_FOLDS, max_pairs_per_fold: int | None = None):
        pairs = heldout_pairs(lfw, folds)
        if max_pairs_per_fold is not None:  # balanced subset per fold (same pairs come first in each fold)
            kept = []
            for fold in folds:
                in_fold = [p for p in pairs if p.fold == fold]
                kept += [p for p in in_fold if p.same][: max_pairs_per_fold // 2]
                kept += [p for p in in_fold if not p.same][: max_pairs_per_fold - max_pairs_per_fold // 2]
            pairs = kept
        self.folds = folds
        self.pairs = pairs
        self.images = sorted({path for p in pairs for path in (p.left, p.right)})
        self.index = {path: i for i, path in enumerate(self.images)}
        self.faces = load_many(lfw, self.images)
        self.gallery, self.probes = identification_split(self.images)

    def evaluate(self, name: str, input_name: str, embed: FaceEmbedFn, progress: bool = False) -> ModelResult:
        start = time.perf_counter()
        vectors = embed_all(self.faces, embed, progress=progress)
        left = np.array([self.index[p.left] for p in self.pairs])
        right = np.array([self.index[p.right] for p in self.pairs])
        scores = np.sum(vectors[left] * vectors[right], axis=1)
        same = np.array([p.same for p in self.pairs])
        folds = np.array([p.fold for p in self.pairs])
        verification = leave_one_fold_out_accuracy(scores, same, folds) if len(self.folds) > 1 else {}
        verification["best_threshold_all_pairs"] = best_threshold(scores, same)
        impostors = int((~same).sum())
        tars: dict[str, float | dict[str, float]] = {"far_resolution": 1.0 / max(impostors, 1)}
        for target in (1e-3, 1e-4):
            tar, threshold = tar_at_far(scores, same, target)
            tars[f"{target:g}"] = {"tar": tar, "threshold": threshold}
        gallery = vectors[[self.index[g] for g in self.gallery]]
        probes = vectors[[self.index[p] for p in self.probes]]
        r1 = rank1(gallery, [identity(g) for g in self.gallery], probes, [identity(p) for p in self.probes])
        return ModelResult(name, input_name, verification, tars, r1, len(self.pairs), len(self.gallery),
                           len(self.probes), time.perf_counter() - start, scores, same)


def resolve_model(model: str, spec: TransformSpec, shared: Path, seed: int, threads: int) -> tuple[str, FaceEmbedFn]:
    """(input name, embed fn) for 'pixel-mobilefacenet', 'sface' or the path of a frequency-model ONNX file."""
    if model == "pixel-mobilefacenet":
        return "pixels", pixel_mobilefacenet_embedder(shared)
    if model == "sface":
        return "pixels", sface_embedder(threads)
    check_model_transform(Path(model), spec)
    features_fn = onnx_features_fn(Path(model), threads)
    return spec.transform_id, frequency_embedder(features_fn, spec, np.random.default_rng(seed))


def check_model_transform(onnx_path: Path, spec: TransformSpec) -> None:
    """Refuse to feed a model features of a transform other than the one in its model.json (noise level aside)."""
    meta_path = onnx_path.parent / "model.json"
    if not meta_path.exists():
        return
    served = TransformSpec.from_dict(json.loads(meta_path.read_text())["transform"])
    if served.with_epsilon(None) != spec.with_epsilon(None, spec.delta):
        raise ValueError(f"{onnx_path} serves {served.transform_id}, not {spec.transform_id} (pick --transform)")


def model_label(model: str) -> str:
    if model in PIXEL_MODELS:
        return model
    path = Path(model)
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def parse_epsilon(text: str | None) -> float | None:
    if text is None or text.strip().lower() in ("none", "inf", "clean"):
        return None
    return float(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True,
                        help="an ONNX frequency model, 'pixel-mobilefacenet' or 'sface' (repeat for a table)")
    parser.add_argument("--transform", default="dct8-v0", choices=sorted(PRESETS))
    parser.add_argument("--epsilon", default="64", help="ε per coefficient of the served noise, or 'none'")
    parser.add_argument("--epsilons", default=None,
                        help="comma list: evaluate the frequency models at each ε and plot accuracy vs ε")
    parser.add_argument("--folds", default="6-10")
    parser.add_argument("--max-pairs-per-fold", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("docs/models/eval"))
    parser.add_argument("--title", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shared-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shared = args.shared_dir or shared_dir()
    folds = parse_folds(args.folds)
    spec = PRESETS[args.transform](parse_epsilon(args.epsilon))
    data = HeldoutSet(lfw_dir(shared), folds, args.max_pairs_per_fold)
    print(f"folds {folds}: {len(data.pairs)} pairs, {len(data.images)} images; 1:N gallery {len(data.gallery)}, "
          f"probes {len(data.probes)}", flush=True)
    epsilons = [parse_epsilon(e) for e in args.epsilons.split(",")] if args.epsilons else [spec.epsilon_per_coefficient]
    results: list[ModelResult] = []
    sweep: dict[str, list[tuple[float | None, float, float]]] = defaultdict(list)
    for model in args.model:
        for epsilon in (epsilons if model not in PIXEL_MODELS else [None]):
            run_spec = spec.with_epsilon(epsilon)
            input_name, embed = resolve_model(model, run_spec, shared, args.seed, args.threads)
            result = data.evaluate(model_label(model), input_name, embed, progress=True)
            results.append(result)
            if model not in PIXEL_MODELS:
                sweep[model].append((epsilon, result.verification["accuracy"], result.verification["accuracy_std"]))
            print(f"{result.name} [{result.input}]: acc {100 * result.verification['accuracy']:.2f}% "
                  f"± {100 * result.verification['accuracy_std']:.2f}, TAR@1e-3 "
                  f"{100 * result.tar_at_far['0.001']['tar']:.2f}%, TAR@1e-4 {100 * result.tar_at_far['0.0001']['tar']:.2f}%, "
                  f"rank-1 {100 * result.rank1:.2f}% ({result.seconds:.0f} s)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    title = args.title or f"LFW folds {args.folds}"
    plots = [str(p) for p in plot_roc_det(results, args.out, title)]
    if args.epsilons:
        reference = {f"{r.name} (pixels)": r.verification["accuracy"] for r in results if r.input == "pixels"}
        for model, rows in sweep.items():
            path = args.out / f"accuracy_vs_epsilon_{Path(model).parent.name or 'model'}.png"
            plots.append(str(plot_accuracy_vs_epsilon(rows, reference, path, f"{model_label(model)} on {title}")))
    table = markdown_table(results)
    report = {"protocol": PROTOCOL, "folds": list(folds), "transform": spec.to_dict(),
              "seed": args.seed, "command": "python -m training_jobs.evaluate " + " ".join(argv or __import__("sys").argv[1:]),
              "results": [r.to_dict() for r in results], "plots": plots, "table": table}
    (args.out / "results.json").write_text(json.dumps(report, indent=1, default=_json_default) + "\n")
    print(table)


def _json_default(value: object) -> object:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    raise TypeError(type(value))


if __name__ == "__main__":
    main()
