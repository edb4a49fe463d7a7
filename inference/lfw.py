"""Access to the aligned LFW data in the shared folder: pairs protocol, identity splits, images.

Kept apart from the models so that stats, export metrics, tests and training all read LFW the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from common.paths import shared_dir

__all__ = ["LFW_SUBDIR", "PAIRS_PER_FOLD", "Pair", "fold_pairs", "images_outside_pairs", "lfw_dir", "load_many",
           "load_rgb", "pair_identities", "read_pairs", "shared_dir"]
LFW_SUBDIR = Path("datasets") / "lfw-aligned-112"
PAIRS_PER_FOLD = 600


def lfw_dir(shared: Path | None = None) -> Path:
    return Path(shared or shared_dir()) / LFW_SUBDIR


@dataclass(frozen=True)
class Pair:
    """One pairs.txt line: two image paths relative to the LFW folder and whether they share an identity."""

    left: str
    right: str
    same: bool
    fold: int


def image_path(name: str, number: int) -> str:
    return f"{name}/{name}_{number:04d}.jpg"


def read_pairs(lfw: Path) -> list[Pair]:
    """All 6,000 pairs of the official View-2 protocol, fold = 1..10 in file order."""
    lines = (lfw / "pairs.txt").read_text().split("\n")
    pairs = []
    for index, line in enumerate(l for l in lines[1:] if l.strip()):
        fields = line.split("\t")
        fold = index // PAIRS_PER_FOLD + 1
        if len(fields) == 3:
            pairs.append(Pair(image_path(fields[0], int(fields[1])), image_path(fields[0], int(fields[2])), True, fold))
        else:
            pairs.append(Pair(image_path(fields[0], int(fields[1])), image_path(fields[2], int(fields[3])), False, fold))
    return pairs


def fold_pairs(lfw: Path, fold: int) -> list[Pair]:
    return [p for p in read_pairs(lfw) if p.fold == fold]


def pair_identities(lfw: Path) -> set[str]:
    """Every identity named anywhere in pairs.txt (all ten folds)."""
    return {path.split("/")[0] for pair in read_pairs(lfw) for path in (pair.left, pair.right)}


def images_outside_pairs(lfw: Path) -> list[str]:
    """Relative paths of every image whose identity appears in no fold: safe for stats and training."""
    excluded = pair_identities(lfw)
    return sorted(str(p.relative_to(lfw)) for person in sorted(lfw.iterdir())
                  if person.is_dir() and person.name not in excluded for p in sorted(person.glob("*.jpg")))


def every_image(root: Path) -> list[str]:
    """Relative paths of every image of every person folder under ``root`` (a face folder laid out as LFW is)."""
    return sorted(str(p.relative_to(root)) for person in sorted(root.iterdir()) if person.is_dir()
                  for p in sorted(person.glob("*.jpg")))


def load_rgb(lfw: Path, relative: str) -> np.ndarray:
    """One aligned face as RGB uint8 [112, 112, 3]."""
    bgr = cv2.imread(str(lfw / relative), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(lfw / relative)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def load_many(lfw: Path, relatives: list[str]) -> np.ndarray:
    """Faces as RGB uint8 [N, 112, 112, 3]."""
    return np.stack([load_rgb(lfw, r) for r in relatives])
