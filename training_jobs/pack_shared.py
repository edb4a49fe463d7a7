"""Copy of the shared folder holding only what training reads: training identities' images and the teacher.

    python -m training_jobs.pack_shared --out gpu_pack/shared [--eval-folds 6 7 8 9 10]

Why: a lent accelerator receives the checkout and at most 64 MiB beside it, and it must never receive the
held-out identities. The pack holds `pairs.txt` (the split is computed from it), every image of every identity
that appears in none of the evaluation folds (the same list `datasets.make_split` trains on), and the
pretrained MobileFaceNet. Point `PRIVFACE_SHARED_DIR` at it and `training_jobs.train` runs unchanged; no
evaluation image is in it, so configs used with a pack set `eval.epoch_pairs_per_fold: 0`.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from inference.lfw import LFW_SUBDIR, lfw_dir, shared_dir
from inference.mobilefacenet import WEIGHTS_SUBPATH
from training_jobs.datasets import DEFAULT_EVAL_FOLDS, make_split


def build_pack(shared: Path, out: Path, eval_folds: tuple[int, ...] = DEFAULT_EVAL_FOLDS) -> dict[str, int]:
    """Write the pack; returns counts and bytes so the caller can check the transfer limit."""
    lfw = lfw_dir(shared)
    split = make_split(lfw, eval_folds)
    target = out / LFW_SUBDIR
    if out.exists():
        shutil.rmtree(out)
    target.mkdir(parents=True)
    shutil.copy2(lfw / "pairs.txt", target / "pairs.txt")
    for image in split.train_images:
        (target / image).parent.mkdir(exist_ok=True)
        shutil.copy2(lfw / image, target / image)
    (out / WEIGHTS_SUBPATH).parent.mkdir(parents=True)
    shutil.copy2(shared / WEIGHTS_SUBPATH, out / WEIGHTS_SUBPATH)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    leaked = split.eval_identities & {p.name for p in target.iterdir() if p.is_dir()}
    if leaked:  # make_split already excludes them; this guards the pack itself
        raise RuntimeError(f"{len(leaked)} evaluation identities in the pack")
    return {"images": len(split.train_images), "identities": split.num_classes, "bytes": size}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--eval-folds", type=int, nargs="+", default=list(DEFAULT_EVAL_FOLDS))
    args = parser.parse_args(argv)
    counts = build_pack(Path(shared_dir()), args.out, tuple(args.eval_folds))
    print(f"{counts['images']} images of {counts['identities']} identities, {counts['bytes'] / 2**20:.1f} MiB "
          f"in {args.out}")


if __name__ == "__main__":
    main()
