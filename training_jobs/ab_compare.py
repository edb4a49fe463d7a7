"""Two trained models on the SAME held-out pairs, with a paired comparison: is B better than A, and by how much?

    python -m training_jobs.ab_compare --run A=var/training/cpu-sealed-celeba-a --run B=var/training/cpu-sealed-celeba-b \
        --folds 6-10 [--pairs-per-fold 100] [--out docs/results/celeba_ab.json] [--root VALIDATION_SET --folds 1-10]
        [--flip A --flip B] [--bundle A=inference/bundled/sealed-vN --bundle B=... [--gallery 1000 --fpir 0.01]]
    python -m training_jobs.ab_compare --run A=<old version dir> --run B=inference/bundled/v5-balanced \
        --bundle A=<old version dir> --bundle B=inference/bundled/v5-balanced --folds 6-10

A --run is a training run folder (its checkpoints/last.pt) or a gateway model version folder (model.json + ONNX,
embedded with ONNX Runtime under the transform it names; two versions of different transforms compare on the same
pairs and the same noise seed).

Why paired: the two models see the same pairs with the same transform-noise draws, so their difference has far less
spread than each accuracy's ± over folds suggests. Per pair, each model's decision uses the threshold chosen on the
OTHER folds (the leave-one-fold-out protocol of training_jobs.evaluate); the interval is a bootstrap over pairs
(resampling A's and B's decisions together). Folds 6-10 are evaluated only; nothing here is tuned on them.
With --bundle, the same pairs are also decided at each served bundle's own thresholds (sealed.json or model.json) (1:1, and the 1:N
schedule's at a gallery size): what the service would answer, which a threshold chosen on the pairs does not show.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inference.lfw import lfw_dir, shared_dir
from inference.metadata import ModelMetadata
from inference.operating_points import ImpostorCurve
from inference.sealed_student import SealedFaceModel, flip_signs
from training_jobs.eval_report import print_and_save
from training_jobs.evaluate import HeldoutSet, ModelResult, frequency_embedder, onnx_features_fn, parse_folds, \
    torch_features_fn
from training_jobs.students import build_student
from training_jobs.train_config import make_spec

BOOTSTRAP = 2000


def evaluate_run(run: Path, heldout: HeldoutSet, name: str, seed: int, flip: bool = False) -> ModelResult:
    """The run's checkpoint (OUT/checkpoints/last.pt) on the held-out pairs, noise drawn from `seed`; ``flip``: a
    sealed student embeds e(x) + e(flip x), as a bundle with flip_signs is served."""
    state = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    config = state["config"]
    spec = make_spec(config)
    student = build_student(config["model"], spec, shared_dir())
    student.load_state_dict(state["student"])
    student.eval()
    if flip:
        if not isinstance(student, SealedFaceModel):
            raise SystemExit(f"error: --flip {name}: only a sealed-cnn run has a test-time flip here")
        student.flip = flip_signs(spec)
    embed = frequency_embedder(torch_features_fn(student), spec, np.random.default_rng(seed))
    return heldout.evaluate(name, spec.transform_id, embed)


def evaluate_model_version(version_dir: Path, heldout: HeldoutSet, name: str, seed: int) -> ModelResult:
    """A gateway model version (model.json + its ONNX file) on the held-out pairs, as the gateway embeds."""
    meta = ModelMetadata.load(version_dir)
    embed = frequency_embedder(onnx_features_fn(version_dir / meta.onnx_file), meta.spec, np.random.default_rng(seed))
    return heldout.evaluate(name, meta.spec.transform_id, embed)


def correct_per_pair(result: ModelResult, folds: np.ndarray) -> np.ndarray:
    """Each pair's decision at the threshold chosen on the other folds, right (True) or wrong."""
    thresholds = np.array([result.verification["per_fold"][int(f)]["threshold"] for f in folds])
    right: np.ndarray = (result.scores >= thresholds) == result.same
    return right


def served_decisions(result: ModelResult, flip: bool, bundle: Path, gallery: int, fpir: float) -> dict[str, Any]:
    """The pairs' decisions at a served bundle's own thresholds, as the service decides (no threshold from the pairs):
    1:1 at sealed.json's `threshold`; 1:N at the gateway's schedule step for a gallery of `gallery` at `fpir` per
    search (inference/operating_points.py, secure/thresholds.py)."""
    sealed = (bundle / "sealed.json").is_file()
    meta = json.loads((bundle / ("sealed.json" if sealed else "model.json")).read_text())
    if meta.get("transform_id", result.input) != result.input:
        raise SystemExit(f"error: --bundle {result.name}: the bundle serves {meta['transform_id']}, the run "
                         f"{result.input}")
    if sealed and bool(meta.get("flip_signs")) != flip:
        raise SystemExit(f"error: --bundle {result.name}: the bundle's threshold is for scores "
                         f"{'with' if meta.get('flip_signs') else 'without'} the test-time flip (--flip {result.name})")
    verify = float(meta["threshold"])
    schedule = ImpostorCurve.from_dict(meta["impostor_curve"]).identify_schedule(fpir, floor=verify)
    identify = next((t for n, t in schedule if gallery <= n), schedule[-1][1])  # the step the gateway uses
    genuine, impostor = result.scores[result.same], result.scores[~result.same]
    return {"bundle": str(bundle), "verify_threshold": verify, "right_at_verify": (result.scores >= verify) == result.same,
            "genuine_accepted": float((genuine >= verify).mean()), "impostors_accepted": float((impostor >= verify).mean()),
            "gallery": gallery, "fpir": fpir, "identify_threshold": identify,
            "genuine_above_identify_threshold": float((genuine >= identify).mean()),
            "genuine_above_identify": genuine >= identify}


def is_run(path: Path) -> bool:
    return (path / "checkpoints" / "last.pt").is_file()


def is_model_version(path: Path) -> bool:
    return (path / "model.json").is_file()


def paired(a: np.ndarray, b: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """Accuracy difference B - A with a 95% bootstrap interval over pairs, and the discordant pair counts."""
    rng = np.random.default_rng(seed)  # resampling an evaluation, not protecting data
    draws = rng.integers(0, len(a), size=(BOOTSTRAP, len(a)))
    diffs = b[draws].mean(axis=1) - a[draws].mean(axis=1)
    return {"b_minus_a": float(b.mean() - a.mean()), "ci95": [float(np.quantile(diffs, 0.025)),
                                                             float(np.quantile(diffs, 0.975))],
            "only_a_right": int((a & ~b).sum()), "only_b_right": int((b & ~a).sum()), "pairs": len(a)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, help="NAME=var/training/<run> (twice: A, then B)")
    parser.add_argument("--folds", type=parse_folds, default=(6, 7, 8, 9, 10))
    parser.add_argument("--pairs-per-fold", type=int, default=None, help="default: every pair of the folds")
    parser.add_argument("--seed", type=int, default=0, help="transform-noise seed (the trainer's eval.seed is 0)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--flip", action="append", default=[], metavar="NAME",
                        help="evaluate run NAME with the sealed test-time flip (repeatable)")
    parser.add_argument("--bundle", action="append", default=[], metavar="NAME=DIR",
                        help="also score run NAME at the served thresholds of bundle DIR, sealed or gateway (both, or none)")
    parser.add_argument("--gallery", type=int, default=1000, help="gallery size of the 1:N threshold (--bundle)")
    parser.add_argument("--fpir", type=float, default=0.01, help="false-positive rate per search (--bundle)")
    parser.add_argument("--root", type=Path, default=None,
                        help="a folder laid out as LFW with its own pairs.txt (training_jobs.validation_set); default LFW")
    args = parser.parse_args(argv)
    runs = [item.split("=", 1) for item in args.run]
    if len(runs) != 2 or any(len(r) != 2 or not (is_run(Path(r[1])) or is_model_version(Path(r[1]))) for r in runs):
        raise SystemExit("error: give exactly two --run NAME=DIR, each with DIR/checkpoints/last.pt or DIR/model.json")
    heldout = HeldoutSet(args.root or lfw_dir(shared_dir()), args.folds, args.pairs_per_fold)
    folds = np.array([p.fold for p in heldout.pairs])
    if set(args.flip) - {name for name, _ in runs}:
        raise SystemExit(f"error: --flip names no --run: {sorted(set(args.flip) - {name for name, _ in runs})}")
    if any(name in args.flip and not is_run(Path(path)) for name, path in runs):
        raise SystemExit("error: --flip is for sealed-cnn runs; a gateway model version flips inside its ONNX graph")
    results = [evaluate_run(Path(path), heldout, name, args.seed, name in args.flip) if is_run(Path(path))
               else evaluate_model_version(Path(path), heldout, name, args.seed) for name, path in runs]
    rights = [correct_per_pair(r, folds) for r in results]
    report = {"root": str(args.root or "LFW View 2"), "folds": list(args.folds), "pairs": len(heldout.pairs), "noise_seed": args.seed,
              "models": {r.name: {"run": path, "test_time_flip": r.name in args.flip, **r.to_dict()}
                         for r, (_, path) in zip(results, runs)},
              "paired": paired(rights[0], rights[1])}
    bundles = dict(item.split("=", 1) for item in args.bundle)
    if bundles:
        if sorted(bundles) != sorted(r.name for r in results):
            raise SystemExit("error: give a --bundle NAME=DIR for each --run, or none")
        served = [served_decisions(r, r.name in args.flip, Path(bundles[r.name]), args.gallery, args.fpir)
                  for r in results]
        genuine = [s.pop("genuine_above_identify") for s in served]
        report["served"] = {
            "models": {r.name: {k: v for k, v in s.items() if k != "right_at_verify"} for r, s in zip(results, served)},
            "paired_at_verify_threshold": paired(served[0]["right_at_verify"], served[1]["right_at_verify"]),
            "paired_genuine_above_identify_threshold": paired(genuine[0], genuine[1])}
    print_and_save(report, args.out)


if __name__ == "__main__":
    main()
