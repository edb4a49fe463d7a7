"""Do a served model's thresholds hold their false-match rates on people the model never trained on?

    python -m training_jobs.threshold_check --model sealed=inference/bundled/sealed-v7 \
        --checkpoint training_jobs/checkpoints/cpu-sealed-quad-w128-hint.pt [--model gateway=inference/bundled/v1-accurate]
        [--folds 6-10 | --root /work/data/celeba-val] [--per-person 4] [--gallery 1000 --fpir 0.01] [--out X.json]

Why: a model's thresholds come from calibration impostors (inference/operating_points.py); what a tenant is promised
is the rate on NEW people. A model is a sealed bundle (sealed.json; embedded by the plaintext twin of --checkpoint,
which it must be an export of) or a gateway model version (model.json; embedded by ONNX Runtime). View 2's 1,500 impostor pairs of folds 6-10 resolve a 1e-3 rate to +-1.5 accepted pairs;
here every image (at most ``--per-person`` per person) of the chosen people is embedded once, as the SDK sends it
(the model's transform, one noise draw per image, a sealed bundle's test-time flip), and every pair of images of
different people is an impostor pair (millions). For each model: the realised rate at its verify threshold, at its
curve's 1e-4 threshold and at the identify threshold of a gallery of ``--gallery`` (per-comparison target
1 - (1 - fpir)^(1/N)), each with a 95% interval from resampling PEOPLE (pairs that share a person are not
independent, so a binomial interval over pairs would be too narrow); and the share of same-person pairs accepted.
Folds 6-10 are only measured here; nothing is tuned on them.
"""
from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inference.evaluation import EmbedFn, embed_images
from inference.lfw import every_image, lfw_dir, read_pairs, shared_dir
from inference.metadata import METADATA_FILE, ModelMetadata, file_sha256
from inference.operating_points import ImpostorCurve, per_comparison_fmr
from inference.runtime import OrtEmbedder
from inference.sealed_export import SEALED_FILE, load_checkpoint, twin_embed
from inference.transform import TransformSpec
from training_jobs.eval_report import print_and_save
from training_jobs.evaluate import parse_folds

BOOTSTRAP = 1000
CHUNK = 1024


def chosen_images(root: Path, folds: tuple[int, ...] | None, per_person: int) -> list[str]:
    """At most ``per_person`` images of each person: of the people named in ``folds``' pairs, or (no folds) of
    every person folder under ``root``."""
    people = None if folds is None else {path.split("/")[0] for pair in read_pairs(root) if pair.fold in folds
                                         for path in (pair.left, pair.right)}
    chosen: list[str] = []
    count: dict[str, int] = {}
    for path in every_image(root):
        name = path.split("/")[0]
        if (people is None or name in people) and count.get(name, 0) < per_person:
            count[name] = count.get(name, 0) + 1
            chosen.append(path)
    return chosen


def accepted_pairs(emb: np.ndarray, person: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Person indices (a, b) of every pair of distinct images i < j with cosine >= threshold."""
    rows_a, rows_b = [], []
    for start in range(0, len(emb), CHUNK):
        scores = emb[start:start + CHUNK] @ emb.T
        i, j = np.nonzero(scores >= threshold)
        i = i + start
        keep = j > i
        rows_a.append(person[i[keep]])
        rows_b.append(person[j[keep]])
    return np.concatenate(rows_a), np.concatenate(rows_b)


def realised_rate(emb: np.ndarray, person: np.ndarray, threshold: float, seed: int = 0) -> dict[str, Any]:
    """Impostor pairs accepted at ``threshold`` (rate, 95% people-bootstrap interval) and same-person pairs accepted."""
    a, b = accepted_pairs(emb, person, threshold)
    people = int(person.max()) + 1
    sizes = np.bincount(person, minlength=people).astype(np.float64)
    impostor = a != b
    hits = np.zeros((people, people))
    np.add.at(hits, (a[impostor], b[impostor]), 1.0)
    hits = hits + hits.T
    pairs = np.outer(sizes, sizes)
    np.fill_diagonal(pairs, 0.0)
    total_pairs, total_hits = pairs.sum() / 2, hits.sum() / 2
    rng = np.random.default_rng(seed)
    rates = []
    for _ in range(BOOTSTRAP):  # people drawn with replacement; a person drawn twice is not its own impostor
        w = np.bincount(rng.integers(0, people, people), minlength=people).astype(np.float64)
        rates.append(float(w @ hits @ w) / max(float(w @ pairs @ w), 1.0))  # zero diagonals: a person's copies never pair
    genuine_pairs = float((sizes * (sizes - 1) / 2).sum())
    return {"threshold": threshold, "impostor_pairs": int(total_pairs), "impostors_accepted": int(total_hits),
            "realised_fmr": total_hits / total_pairs, "realised_fmr_95": [float(np.quantile(rates, 0.025)),
                                                                          float(np.quantile(rates, 0.975))],
            "genuine_pairs": int(genuine_pairs),
            "genuine_accepted": float((~impostor).sum() / genuine_pairs) if genuine_pairs else None}


def bundle_thresholds(meta: dict[str, Any], gallery: int, fpir: float) -> dict[str, tuple[float, float]]:
    """Target rate -> (target, threshold) as the service serves them: verify, the curve at 1e-4, identify at N."""
    curve = ImpostorCurve.from_dict(meta["impostor_curve"])
    verify = float(meta["threshold"])
    schedule = curve.identify_schedule(fpir, floor=verify)
    identify = next((t for n, t in schedule if gallery <= n), schedule[-1][1])  # the step the gateway uses
    stated = re.match(r"false-match rate (\S+) ", meta["threshold_source"])  # as both exporters write it
    if stated is None:
        raise SystemExit(f"error: threshold_source names no target rate: {meta['threshold_source']!r}")
    target = float(stated.group(1))
    return {"verify": (target, verify), "fmr_1e-4": (1e-4, curve.threshold(1e-4)),
            f"identify_n{gallery}": (per_comparison_fmr(fpir, gallery), identify)}


@dataclass
class Served:
    """One served model version: its thresholds (``meta``) and how to embed as the service does (``embedder``).
    Versions with the same ``key`` embed identically (one checkpoint exported twice), so faces are embedded once."""

    meta: dict[str, Any]
    key: str
    spec: TransformSpec
    embedder: Callable[[], EmbedFn]


def _sealed(folder: Path, checkpoint: Path | None) -> Served:
    """A sealed bundle (sealed.json), embedded by the plaintext twin of ``checkpoint``, which it must be an export of."""
    meta = json.loads((folder / SEALED_FILE).read_text())
    if checkpoint is None:
        raise SystemExit(f"error: {folder} is a sealed bundle: give --checkpoint, the file it was exported from")
    if meta["source"].get("checkpoint_sha256") != file_sha256(checkpoint):
        raise SystemExit(f"error: {folder}: exported from another checkpoint than {checkpoint}")
    flip = meta.get("flip_signs") or None

    def embedder() -> EmbedFn:
        model, _, _ = load_checkpoint(checkpoint)
        model.flip = flip
        embed: EmbedFn = twin_embed(model)
        return embed

    spec = TransformSpec.from_dict(meta["transform"])
    return Served(meta, f"sealed:{meta['source']['checkpoint_sha256']}:flip={flip is not None}", spec, embedder)


def _gateway(folder: Path) -> Served:
    """A gateway model version (model.json + ONNX), embedded by ONNX Runtime as the gateway embeds."""
    meta = ModelMetadata.load(folder)  # checks the ONNX file's sha256
    onnx_path = folder / meta.onnx_file
    thresholds = {"threshold": meta.threshold, "impostor_curve": meta.impostor_curve,
                  "threshold_source": str(meta.metrics.get("served_threshold", ""))}
    return Served(thresholds, f"onnx:{meta.sha256}", meta.spec,
                  lambda: OrtEmbedder(onnx_path, prefer_gpu=False, intra_op_threads=1).embed)


def load_models(items: list[str], checkpoint: Path | None) -> dict[str, Served]:
    """NAME=DIR -> Served, for sealed bundles (DIR/sealed.json) and gateway model versions (DIR/model.json)."""
    served = {}
    for item in items:
        name, _, folder = item.partition("=")
        path = Path(folder)
        if name and (path / SEALED_FILE).is_file():
            served[name] = _sealed(path, checkpoint)
        elif name and (path / METADATA_FILE).is_file():
            served[name] = _gateway(path)
        else:
            raise SystemExit(f"error: --model {item}: give NAME=DIR with DIR/{SEALED_FILE} or DIR/{METADATA_FILE}")
    return served


def embeddings(root: Path, images: list[str], models: dict[str, Served], seed: int) -> dict[str, np.ndarray]:
    """Each key's embeddings of ``images`` (rows in order), the same noise draws for every model."""
    out: dict[str, np.ndarray] = {}
    for model in models.values():
        if model.key not in out:
            vectors = embed_images(root, images, model.spec, model.embedder(), np.random.default_rng(seed))
            out[model.key] = np.stack([vectors[p] for p in images])
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, metavar="NAME=DIR",
                        help="a sealed bundle or a gateway model version (repeatable)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="the checkpoint the sealed bundles export")
    parser.add_argument("--root", type=Path, default=None, help="face folder laid out as LFW; default LFW")
    parser.add_argument("--folds", type=parse_folds, default=None, help="people of these View-2 folds (LFW: 6-10)")
    parser.add_argument("--per-person", type=int, default=4)
    parser.add_argument("--gallery", type=int, default=1000)
    parser.add_argument("--fpir", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0, help="transform noise and bootstrap")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.checkpoint is not None and not args.checkpoint.is_file():
        parser.error(f"--checkpoint {args.checkpoint}: no such file")
    root = args.root or lfw_dir(shared_dir())
    folds = args.folds if args.root is None or args.folds is not None else None
    if args.root is None and folds is None:
        parser.error("on LFW give --folds (6-10: the held-out people)")
    models = load_models(args.model, args.checkpoint)
    torch.set_num_threads(1)
    images = chosen_images(root, folds, args.per_person)
    names = sorted({p.split("/")[0] for p in images})
    person = np.searchsorted(names, [p.split("/")[0] for p in images])
    embedded = embeddings(root, images, models, args.seed)
    report: dict[str, Any] = {"root": str(root), "folds": list(folds) if folds else None, "images": len(images),
                              "people": len(names), "per_person": args.per_person, "noise_seed": args.seed,
                              "checkpoint": str(args.checkpoint), "models": {}}
    for name, model in models.items():
        rows = {key: {"target_fmr": target, **realised_rate(embedded[model.key], person, threshold, args.seed)}
                for key, (target, threshold) in bundle_thresholds(model.meta, args.gallery, args.fpir).items()}
        report["models"][name] = {"threshold_source": model.meta["threshold_source"], **rows}
    print_and_save(report, args.out)


if __name__ == "__main__":
    main()
