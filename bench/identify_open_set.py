"""Open-set 1:N on held-out people: how often an UNENROLLED person is matched to someone, by gallery size.

    python -m bench.identify_open_set --model var/test-models/v0 [--sizes 200,2000] [--fpir 0.01] [--out FILE]

Data: LFW View-2 folds 6-10 identities only (evaluation; nothing here tunes anything). Every image goes through
the model's own input (the SDK transform with its noise, one draw per image, seed 0). Per gallery size N:
N enrolled people (one image each, the first of each identity in sorted order), probes = the other images of
those people (genuine) and every image of people not enrolled (impostors). Decisions are the plaintext ones the
MPC reproduces exactly (0 disagreements, bench/e2e.py): best score >= threshold.
Two policies side by side: the 1:1 threshold at every N (the old behaviour) and the model's identify schedule
at the target FPIR (inference/operating_points.py, calibrated on identities in no View-2 fold).
Prints a JSON document.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from inference.evaluation import embed_images
from inference.lfw import lfw_dir, read_pairs, shared_dir
from inference.metadata import ModelMetadata
from inference.operating_points import ImpostorCurve
from inference.runtime import OrtEmbedder
from bench.report import emit

EVAL_FOLDS = (6, 7, 8, 9, 10)


def held_out_images(lfw: Path) -> dict[str, list[str]]:
    """Every image of every identity named in folds 6-10 pairs."""
    names = {path.split("/")[0] for p in read_pairs(lfw) if p.fold in EVAL_FOLDS for path in (p.left, p.right)}
    return {n: sorted(str(x.relative_to(lfw)) for x in (lfw / n).glob("*.jpg")) for n in sorted(names)}


def open_set(emb: dict[str, np.ndarray], people: dict[str, list[str]], n: int, threshold_of_n, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    with_two = [p for p in people if len(people[p]) >= 2]
    enrolled = sorted(rng.choice(with_two, size=min(n, len(with_two)), replace=False).tolist()) if n <= len(with_two) \
        else sorted(rng.choice(list(people), size=n, replace=False).tolist())
    gallery = np.stack([emb[people[p][0]] for p in enrolled])
    genuine = [(i, img) for i, p in enumerate(enrolled) for img in people[p][1:]]
    impostor = [img for p in people if p not in set(enrolled) for img in people[p]]
    t = threshold_of_n(len(enrolled))

    def best(img: str) -> tuple[int, float]:
        s = gallery @ emb[img]
        k = int(np.argmax(s))
        return k, float(s[k])

    imp = [best(img)[1] >= t for img in impostor]
    gen = [best(img) for _, img in genuine]
    correct = [k == i and s >= t for (i, _), (k, s) in zip(genuine, gen)]
    wrong = [k != i and s >= t for (i, _), (k, s) in zip(genuine, gen)]
    return {"N": len(enrolled), "threshold": t, "unenrolled_probes": len(impostor),
            "unenrolled_matched_rate": float(np.mean(imp)) if imp else None,
            "genuine_probes": len(genuine), "correct_subject_rate": float(np.mean(correct)) if correct else None,
            "wrong_subject_rate": float(np.mean(wrong)) if wrong else None}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="a model version directory (model.json + onnx)")
    ap.add_argument("--sizes", default="200,2000")
    ap.add_argument("--fpir", type=float, default=0.01)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    meta = ModelMetadata.load(args.model)
    lfw = lfw_dir(shared_dir())
    people = held_out_images(lfw)
    embedder = OrtEmbedder(args.model / meta.onnx_file, prefer_gpu=False)
    images = [img for imgs in people.values() for img in imgs]
    emb = embed_images(lfw, images, meta.spec, embedder.embed, np.random.default_rng(0))
    curve = ImpostorCurve.from_dict(meta.impostor_curve) if meta.impostor_curve else None
    schedule = curve.identify_schedule(args.fpir, floor=meta.threshold) if curve else None

    steps = schedule or []  # by_schedule is used only when there is a schedule

    def by_schedule(n: int) -> float:
        return next((t for max_n, t in steps if n <= max_n), steps[-1][1])

    out = {"model": meta.version, "transform": meta.spec.transform_id, "folds": list(EVAL_FOLDS),
           "people": len(people), "images": len(images), "verify_threshold": meta.threshold,
           "fpir_target": args.fpir, "schedule": schedule, "results": []}
    for n in [int(x) for x in args.sizes.split(",")]:
        out["results"].append({"policy": "1:1 threshold at every N", **open_set(emb, people, n, lambda _n: meta.threshold)})
        if schedule:
            out["results"].append({"policy": f"identify schedule, FPIR {args.fpir:g}", **open_set(emb, people, n, by_schedule)})
    emit(out, args.out)


if __name__ == "__main__":
    main()
