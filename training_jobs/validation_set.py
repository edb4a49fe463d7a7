"""A labelled face-verification set outside LFW, for decisions that must not look at LFW View-2 folds 6-10.

Why: choosing what to serve (a model, a test-time option) by its accuracy on folds 6-10 tunes on the pairs the
figures are reported on. CelebA people grouped by identity (Nikhil4902/CelebA_Dataset: folders `celeb_<k>/`, 194
people x 30 photos, CelebA was built without LFW's people) give a second set to decide on. Their photos are
aligned the SDK's way by `python -m training_jobs.extra_faces prepare` (this module only picks the faces that
step kept) and laid out as LFW is, so every evaluation here reads it unchanged (the folder must be new or empty):

    python -m training_jobs.validation_set build --people DIR_WITH_celeb_FOLDERS --aligned /work/data/extra-aligned \
        --out /work/data/celeba-val
    python -m training_jobs.ab_compare --root /work/data/celeba-val --folds 1-10 --run A=... --run B=...

Layout: OUT/<person>/<person>_NNNN.jpg (hard links to the aligned faces) and OUT/pairs.txt in View-2's format:
10 folds of 300 same-person and 300 different-person pairs, people split between folds (a person is in one fold
only), drawn with a fixed seed. OUT/people.txt lists the source file of every face, so a training run can leave
them out (`exclude`, photo by photo: a set the model trained on, even unlabelled, decides nothing). Other photos of
the same people under other file names are not caught here; for CelebA, its identity list is the check (docs/sealed.md).
"""
from __future__ import annotations

import argparse
import itertools
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

FOLDS = 10
SAME_PER_FOLD = DIFFERENT_PER_FOLD = 300
SEED = 0  # choosing pairs, not protecting data


def people_faces(people: Path, aligned: Path) -> dict[str, list[str]]:
    """person -> the source file names of their photos that the prepare step aligned (sorted; >= 2 per person)."""
    found: dict[str, list[str]] = {}
    for folder in sorted(people.rglob("celeb_*")):
        if not folder.is_dir():
            continue
        names = sorted(p.name for p in folder.iterdir() if (aligned / "faces" / f"{p.stem}.jpg").is_file())
        found.setdefault(folder.name, [])
        found[folder.name] = sorted(set(found[folder.name]) | set(names))
    return {person: names for person, names in found.items() if len(names) >= 2}


def draw_pairs(faces: dict[str, list[str]], rng: np.random.Generator) -> list[list[tuple[str, int, str, int]]]:
    """Per fold: same-person pairs (p, i, p, j), then different-person pairs (p, i, q, j); numbers are 1-based."""
    people = sorted(faces)
    order = [people[i] for i in rng.permutation(len(people))]
    folds = []
    for fold in range(FOLDS):
        members = order[fold::FOLDS]
        same = [(p, i + 1, p, j + 1) for p in members for i, j in itertools.combinations(range(len(faces[p])), 2)]
        different = [(p, i + 1, q, j + 1) for p, q in itertools.combinations(members, 2)
                     for i in range(len(faces[p])) for j in range(len(faces[q]))]
        if len(same) < SAME_PER_FOLD or len(different) < DIFFERENT_PER_FOLD:
            raise ValueError(f"fold {fold + 1}: too few people or photos for {SAME_PER_FOLD} pairs of each kind")
        # in drawn order, not sorted: a --pairs-per-fold subset then spans the fold's people, not the first few
        pick_same = rng.choice(len(same), SAME_PER_FOLD, replace=False)
        pick_different = rng.choice(len(different), DIFFERENT_PER_FOLD, replace=False)
        folds.append([same[k] for k in pick_same] + [different[k] for k in pick_different])
    return folds


def pairs_text(folds: list[list[tuple[str, int, str, int]]]) -> str:
    """View-2's pairs.txt: a header line, then per fold the same pairs (3 fields) and different pairs (4 fields)."""
    lines = [f"{FOLDS}\t{SAME_PER_FOLD}"]
    for fold in folds:
        lines += [f"{p}\t{i}\t{j}" if p == q else f"{p}\t{i}\t{q}\t{j}" for p, i, q, j in fold]
    return "\n".join(lines) + "\n"


def build(people: Path, aligned: Path, out: Path) -> dict[str, int]:
    faces = people_faces(people, aligned)
    if len(faces) < 2 * FOLDS:
        raise ValueError(f"{people}: {len(faces)} people with >= 2 aligned faces; need {2 * FOLDS}")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty: build into a new folder (stale faces would stay otherwise)")
    out.mkdir(parents=True, exist_ok=True)
    for person, names in faces.items():
        (out / person).mkdir()
        for number, name in enumerate(names, start=1):
            os.link(aligned / "faces" / f"{Path(name).stem}.jpg", out / person / f"{person}_{number:04d}.jpg")
    (out / "pairs.txt").write_text(pairs_text(draw_pairs(faces, np.random.default_rng(SEED))))
    (out / "people.txt").write_text("".join(f"{name}\n" for names in faces.values() for name in names))
    return {"people": len(faces), "faces": sum(len(n) for n in faces.values()), "pairs": FOLDS * 2 * SAME_PER_FOLD}


def exclude(kept: Iterable[str], validation: Path) -> list[str]:
    """The extra-faces listing (`faces/<stem>.jpg` lines) without any face of the validation set."""
    stems = {Path(line).stem for line in (validation / "people.txt").read_text().splitlines()}
    return [line for line in kept if Path(line).stem not in stems]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    make = verbs.add_parser("build", help="lay out the validation set and its pairs")
    make.add_argument("--people", type=Path, required=True, help="folder holding celeb_<k>/ folders of photos")
    make.add_argument("--aligned", type=Path, required=True, help="the `extra_faces prepare` output that aligned them")
    make.add_argument("--out", type=Path, required=True)
    drop = verbs.add_parser("exclude", help="rewrite an extra-faces kept.txt without the validation set's faces")
    drop.add_argument("--kept", type=Path, required=True)
    drop.add_argument("--validation", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.verb == "build":
            print(build(args.people, args.aligned, args.out))
        else:
            lines = args.kept.read_text().splitlines()  # a file name may hold a space
            left = exclude(lines, args.validation)
            args.kept.write_text("".join(f"{line}\n" for line in left))
            print(f"{args.kept}: {len(lines)} -> {len(left)} faces")
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
