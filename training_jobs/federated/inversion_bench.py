"""Update inversion with and without MixUp, and MixUp's accuracy cost, in one command (bounded for a CPU).

    PYTHONPATH=$PWD .venv/bin/python -m training_jobs.federated.inversion_bench --victims 3 --photos 2 \
        --distractors 50 --steps 20 --a1-minutes 1.5 --mixup-k 2 --clients 6 --per-round 3 --rounds 1 \
        --pairs-per-fold 10 --out docs/results/federated_inversion.json --grid docs/federated_inversion_grid.png

Runs in the gateway venv (SFace, scipy, matplotlib for --grid; it imports in .venv-federated too); the accuracy half starts `training_jobs.federated.simulate`
under `--federated-python` (.venv-federated, Flower), once per condition, with the same clients, seeds,
held-out pairs (LFW folds 6-10) and noise draws, while the attack half runs here:
- victims: the first `--victims` training identities (outside folds 6-10, by name) with more than `--photos`
  photos; each device trains on its first `--photos` photos, its next photo is its gallery photo (never in
  training); distractors: the next `--distractors` training identities, one gallery photo each;
- each victim's round as the server sees it: the served base model and the class vector the server holds for it
  (the mean embedding of its photos, i.e. what it sent in its first round), the device's real `train_local`
  (augmentation, served noise, MixUp per condition), the update it returns;
- `inversion.invert_update` recovers the feature maps, the A1 inverter (training_jobs/attacks, trained here
  for `--a1-minutes` of CPU on training identities other than the victims and distractors) turns them into
  faces; scores: best PSNR/SSIM against the victim's training photos (either flip), SFace rank-1 of every
  recovered face among the clean gallery photos, cosine to the true clean feature maps; reference rows: the
  attacker's start (the update unused) and A1 on the true noised features (a perfect inversion);
- identification from the model + class vector: the class vector the update carries (in clear, also under
  SecAgg+) is matched against the published model's embeddings of the gallery photos (rank-1).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, TYPE_CHECKING

import numpy as np
import torch

from inference.lfw import load_many
from inference.mobilefacenet import load_pretrained
from inference.transform import TransformSpec, apply, clean
from training_jobs.attacks.a1_inverter import A1
from training_jobs.attacks.data import FLIP_ONLY, attacker_split, normaliser, to_uint8
from training_jobs.attacks.training import Budget, train
from training_jobs.datasets import TransformedFaces, identity_of, make_split
from training_jobs.eval_metrics import rank1
from training_jobs.evaluate import embed_all
from training_jobs.federated.inversion import InversionConfig, ObservedUpdate, best_cosines, invert_update
from training_jobs.federated.local import LocalConfig, initial_class_vector, train_local
from training_jobs.federated.params import build_base_model, freeze_except, get_arrays, set_arrays, travelling_names
from training_jobs.federated.script import run_arguments, setup, write_report
from training_jobs.leakage import psnr, save_grid, ssim, luma

if TYPE_CHECKING:  # imported where used: it loads OpenCV's SFace model
    from training_jobs.sface import SFaceEmbedder

EVAL_FOLDS = (6, 7, 8, 9, 10)


def conditions(k: int) -> list[tuple[str, int, bool]]:
    """(name, mixup k, adaptive): no MixUp, floored-Dirichlet MixUp, adaptive MixUp."""
    return [("none", 0, False), (f"mixup-k{k}", k, False), (f"adaptive-k{k}", k, True)]


def pick_people(lfw: Path, victims: int, photos: int, distractors: int) -> tuple[list[dict[str, Any]], list[str]]:
    """Victims (training photos + one gallery photo) and distractor gallery photos, all training identities."""
    split = make_split(lfw, EVAL_FOLDS)
    by_id: dict[str, list[str]] = {}
    for path in split.train_images:
        by_id.setdefault(identity_of(path), []).append(path)
    names = sorted(by_id)
    chosen = [n for n in names if len(by_id[n]) > photos][:victims]
    if len(chosen) < victims:
        raise ValueError(f"only {len(chosen)} training identities have more than {photos} photos")
    others = [n for n in names if n not in chosen][:distractors]
    people = [{"identity": n, "train": by_id[n][:photos], "gallery": by_id[n][photos]} for n in chosen]
    assert not ({p["identity"] for p in people} | set(others)) & split.eval_identities
    return people, [by_id[n][0] for n in others]


def a1_inverter(lfw: Path, spec: TransformSpec, exclude: set[str], minutes: float, run_dir: Path) -> A1:
    """A1 trained (or resumed) on training identities minus `exclude`, for `minutes` of process CPU."""
    split = attacker_split(lfw)
    keep = [i for i, path in enumerate(split.train_images) if identity_of(path) not in exclude]
    data = TransformedFaces(lfw, [split.train_images[i] for i in keep], [split.train_labels[i] for i in keep],
                            spec, FLIP_ONLY, seed=0)
    attack = A1(spec.num_channels)
    train(attack, data, Budget(minutes, clock="cpu"), run_dir / "checkpoint.pt",
          {"transform": spec.transform_id, "excluded": sorted(exclude)}, log=lambda m: None)
    attack.model.eval()
    return attack


def public_prior(lfw: Path, spec: TransformSpec, exclude: set[str], count: int = 500) -> np.ndarray:
    """The attacker's starting point: the mean noised features of `count` public (training, non-victim) faces."""
    split = attacker_split(lfw)
    paths = [p for p in split.train_images if identity_of(p) not in exclude][:count]
    result: np.ndarray = apply(load_many(lfw, paths), spec, np.random.default_rng(0)).astype(np.float32).mean(0)
    return result


def rebuild(attack: A1, features: np.ndarray, spec: TransformSpec) -> np.ndarray:
    with torch.inference_mode():
        return to_uint8(attack.reconstruct(torch.from_numpy(features.astype(np.float32)) / normaliser(spec)))


def image_scores(rebuilt: np.ndarray, photos: np.ndarray) -> dict[str, Any]:
    """For each real photo: the best PSNR / SSIM over recovered faces and their mirror images."""
    candidates = np.concatenate([rebuilt, rebuilt[:, :, ::-1]])
    best_psnr = [max(psnr(p, c) for c in candidates) for p in photos]
    best_ssim = [max(ssim(luma(p), luma(c)) for c in candidates) for p in photos]
    return {"psnr_db": float(np.mean(best_psnr)), "ssim": float(np.mean(best_ssim))}


def start_accuracy_runs(args: argparse.Namespace, workdir: Path) -> tuple[threading.Thread, dict[str, Any]]:
    """The three simulate runs, one after another, in a background thread; results land in the dict."""
    results: dict[str, Any] = {}

    def run() -> None:
        for name, k, adaptive in conditions(args.mixup_k):
            out = workdir / f"{name}.json"
            cmd = [str(args.federated_python), "-m", "training_jobs.federated.simulate", "--clients",
                   str(args.clients), "--per-round", str(args.per_round), "--rounds", str(args.rounds), "--scope",
                   "whole", "--max-images", str(args.photos), "--pairs-per-fold", str(args.pairs_per_fold),
                   "--seed", str(args.seed), "--out", str(out)]
            if k:
                cmd += ["--mixup-k", str(k)] + (["--mixup-adaptive"] if adaptive else [])
            for attempt in (1, 2):  # on an overloaded machine a round can sample no client (see below): once more
                start = time.perf_counter()
                done = subprocess.run(cmd, capture_output=True, text=True, start_new_session=True)
                if done.returncode != 0 or not out.exists():
                    results[name] = {"error": (done.stderr or done.stdout).strip().splitlines()[-1:]}
                    break
                log = json.loads(out.read_text())
                rounds = log.get("rounds", [])
                results[name] = {"heldout": log.get("heldout"), "seconds": time.perf_counter() - start,
                                 "attempt": attempt, "sampled": [r.get("sampled") for r in rounds],
                                 "replied": [r.get("replied") for r in rounds],
                                 "round_train_seconds": [r.get("train_seconds") for r in rounds]}
                if all(r.get("replied") for r in rounds):
                    break

    thread = threading.Thread(target=run, name="accuracy-runs", daemon=True)
    thread.start()
    return thread, results


def attack_condition(name: str, k: int, adaptive: bool, people: list[dict[str, Any]], faces: list[np.ndarray],
                     spec: TransformSpec, shared: Path, attack: A1, gallery: np.ndarray, gallery_faces: np.ndarray,
                     gallery_ids: list[str],
                     sface: SFaceEmbedder, prior: np.ndarray, args: argparse.Namespace) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Every victim's round under one condition, inverted and scored."""
    model = build_base_model(spec, shared)
    names = travelling_names(model, "whole")
    freeze_except(model, names)
    teacher = load_pretrained(shared).requires_grad_(False).eval()
    published = get_arrays(model, names)
    local = LocalConfig(batch_size=args.photos, mixup_k=k, mixup_adaptive=adaptive)
    with torch.inference_mode():
        model_gallery = model(torch.from_numpy(apply(gallery_faces, spec, np.random.default_rng(args.seed))
                                               .astype(np.float32))).numpy().astype(np.float64)
    rows, rebuilt_all, class_vectors = [], [], []
    for index, (person, photos) in enumerate(zip(people, faces)):
        set_arrays(model, published)
        held = initial_class_vector(model, photos, spec, np.random.default_rng([args.seed, 1, index]))
        result = train_local(model, teacher, photos, spec, held, local, np.random.default_rng([args.seed, 2, index]))
        assert result.class_vector is not None  # supervised training (a held class vector) always returns one
        update = ObservedUpdate(published, get_arrays(model, names), held, result.class_vector, result.num_examples)
        class_vectors.append(result.class_vector.astype(np.float64))
        set_arrays(model, published)
        start = time.perf_counter()
        recovered = invert_update(model, update, spec, local, InversionConfig(steps=args.steps, seed=index),
                                   prior=prior)
        rebuilt = rebuild(attack, recovered.features, spec)
        rebuilt_all.append(rebuilt)
        true = np.concatenate([clean(photos, spec), clean(photos[:, :, ::-1], spec)]).astype(np.float32)
        rows.append({"identity": person["identity"], "attack_seconds": time.perf_counter() - start,
                     "loss_first_last": [recovered.losses[0], recovered.losses[-1]],
                     "feature_cosine": float(best_cosines(recovered.features, true, spec).mean()),
                     "feature_cosine_raw": float(best_cosines(recovered.features, true, spec, unit=False).mean()),
                     **image_scores(rebuilt, photos)})
    ids = [p["identity"] for p in people for _ in range(args.photos)]
    embedded = embed_all(np.concatenate(rebuilt_all), sface.embed)
    summary = {"condition": name, "mixup_k": k, "adaptive": adaptive, "victims": rows,
               "sface_rank1": rank1(gallery, gallery_ids, embedded, ids),
               "class_vector_rank1": rank1(model_gallery, gallery_ids, np.stack(class_vectors),
                                           [p["identity"] for p in people]),
               "psnr_db": float(np.mean([r["psnr_db"] for r in rows])),
               "ssim": float(np.mean([r["ssim"] for r in rows])),
               "feature_cosine": float(np.mean([r["feature_cosine"] for r in rows])),
               "feature_cosine_raw": float(np.mean([r["feature_cosine_raw"] for r in rows]))}
    return summary, rebuilt_all


def reference_rows(people: list[dict[str, Any]], faces: list[np.ndarray], spec: TransformSpec, attack: A1,
                   gallery: np.ndarray, gallery_ids: list[str], sface: SFaceEmbedder, prior: np.ndarray,
                   args: argparse.Namespace) -> list[dict[str, Any]]:
    """What the attacker has without the update (its start: the public prior), and with a perfect inversion."""
    ids = [p["identity"] for p in people for _ in range(args.photos)]
    stacked = np.concatenate(faces)
    rows = []
    for name, features in (("attacker start: mean public face (update unused)", np.repeat(prior[None], len(stacked), 0)),
                           ("A1 on the true noised features (perfect inversion)",
                            apply(stacked, spec, np.random.default_rng(args.seed)).astype(np.float32))):
        rebuilt = rebuild(attack, features, spec)
        scores = [image_scores(rebuilt[i:i + 1], stacked[i:i + 1]) for i in range(len(stacked))]
        clean_maps = [np.concatenate([clean(f, spec), clean(f[:, :, ::-1], spec)]).astype(np.float32)
                      for f in stacked[:, None]]
        rows.append({"condition": name, "feature_cosine": float(np.mean(
                         [best_cosines(features[i:i + 1], t, spec).mean() for i, t in enumerate(clean_maps)])),
                     "feature_cosine_raw": float(np.mean(
                         [best_cosines(features[i:i + 1], t, spec, unit=False).mean() for i, t in enumerate(clean_maps)])),
                     "sface_rank1": rank1(gallery, gallery_ids, embed_all(rebuilt, sface.embed), ids),
                     "psnr_db": float(np.mean([s["psnr_db"] for s in scores])),
                     "ssim": float(np.mean([s["ssim"] for s in scores]))})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--victims", type=int, default=3)
    parser.add_argument("--photos", type=int, default=2, help="training photos per device (one local step)")
    parser.add_argument("--distractors", type=int, default=100)
    parser.add_argument("--steps", type=int, default=100, help="inversion steps per victim")
    parser.add_argument("--a1-minutes", type=float, default=3.0, help="A1 budget, process CPU minutes")
    parser.add_argument("--mixup-k", type=int, default=2)
    run_arguments(parser, clients=12, per_round=6, rounds=2, pairs_per_fold=20)
    parser.add_argument("--epsilon", type=float, default=64.0)
    parser.add_argument("--federated-python", type=Path, default=Path(".venv-federated/bin/python"))
    parser.add_argument("--skip-accuracy", action="store_true", help="attack only (no Flower runs)")
    parser.add_argument("--runs-dir", type=Path, default=Path("var/federated_inversion"))
    parser.add_argument("--grid", type=Path, default=None)
    args = parser.parse_args(argv)
    began = time.perf_counter()
    shared, lfw, spec = setup(epsilon=args.epsilon)
    people, distractors = pick_people(lfw, args.victims, args.photos, args.distractors)
    workdir = Path(tempfile.mkdtemp(prefix="fed-inversion-"))
    accuracy_thread, accuracy = (None, {}) if args.skip_accuracy else start_accuracy_runs(args, workdir)
    faces = [load_many(lfw, p["train"]) for p in people]
    exclude = {p["identity"] for p in people} | {identity_of(d) for d in distractors}
    attack = a1_inverter(lfw, spec, exclude, args.a1_minutes, args.runs_dir / f"a1-{spec.transform_id}")
    from training_jobs.sface import SFaceEmbedder
    sface = SFaceEmbedder(threads=1)
    gallery_paths = [p["gallery"] for p in people] + distractors
    gallery_ids = [identity_of(p) for p in gallery_paths]
    gallery_faces = load_many(lfw, gallery_paths)
    gallery = embed_all(gallery_faces, sface.embed)
    prior = public_prior(lfw, spec, exclude)
    report: dict[str, Any] = {"settings": {**vars(args), "transform": spec.transform_id, "gallery": len(gallery_paths),
                                 "chance_rank1": 1.0 / len(gallery_paths), "inversion": asdict(InversionConfig())},
                    "people": people, "reference": reference_rows(people, faces, spec, attack, gallery, gallery_ids,
                                                                  sface, prior, args), "attack": []}
    grid_rows = {}
    for name, k, adaptive in conditions(args.mixup_k):
        summary, rebuilt = attack_condition(name, k, adaptive, people, faces, spec, shared, attack, gallery,
                                            gallery_faces, gallery_ids, sface, prior, args)
        report["attack"].append(summary)
        grid_rows[f"recovered\n{name}"] = np.concatenate(rebuilt)
        print(json.dumps({key: summary[key] for key in ("condition", "sface_rank1", "class_vector_rank1", "psnr_db",
                                                        "ssim", "feature_cosine", "feature_cosine_raw")}), flush=True)
    if accuracy_thread is not None:
        accuracy_thread.join()
    report["accuracy"] = accuracy
    report["seconds"] = time.perf_counter() - began
    print(write_report(report, args.out))
    if args.grid:
        save_grid(np.concatenate(faces), grid_rows, args.grid,
                  "training identities (outside folds 6-10): real photos (top) vs faces recovered from one update")


if __name__ == "__main__":
    main()
