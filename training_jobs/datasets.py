"""Training data over lfw-aligned-112: identity-disjoint splits and the SDK transform applied on the fly.

Split rule (shared/README.md): the 10 folds of pairs.txt are identity-disjoint. By default the evaluation uses
folds 6–10 and training uses EVERY image of every identity that appears in none of those folds (identities of
folds 1–5 and identities in no fold at all): 3,554 identities, 6,922 images.

`TransformedFaces` returns, per sample:
- features: `TransformSpec.apply` on the augmented face, float32 [K, 14, 14] — the SDK's exact transform
  (clip, calibrated noise, float16 rounding), with a FRESH noise draw per sample and per epoch
  (generator seeded by (seed, epoch, index), so runs are reproducible and no two visits share noise);
- clean: the same augmented face, RGB uint8 [112, 112, 3], for the pixel-domain teacher;
- label: the identity's class index.
Extra faces (`data.extra_faces`, issue 10 item 4): unlabelled aligned faces from PRIVFACE_EXTRA_FACES_DIR (made by
`python -m training_jobs.extra_faces prepare`, which drops look-alikes of folds 6-10) join the labelled images with
label UNLABELLED (-1): the teacher distils into the student on them, the margin loss ignores them.
Augmentation acts on the image BEFORE the transform (horizontal flip, brightness/contrast jitter, small
translation), so teacher and student see the same face.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

from common.paths import PROJECT_ROOT

from inference.lfw import Pair, load_rgb, read_pairs
from inference.transform import TransformSpec, apply
from training_jobs.losses import UNLABELLED

DEFAULT_EVAL_FOLDS = (6, 7, 8, 9, 10)
EXTRA_FACES_DIR_ENV = "PRIVFACE_EXTRA_FACES_DIR"
DEFAULT_EXTRA_FACES_DIR = PROJECT_ROOT.parent / "data" / "celeba-aligned"
VARIABLES = {EXTRA_FACES_DIR_ENV: (
    "../data/celeba-aligned", "Unlabelled aligned faces that add distillation to a training run with "
    "`data.extra_faces: true` (made by `python -m training_jobs.extra_faces prepare`; kept outside the repository).")}
# the model card's licence note for a model trained with extra faces (training_jobs/model_card.py)
EXTRA_FACES_LICENSE = (
    "CelebA (Liu, Luo, Wang, Tang, ICCV 2015) and UTKFace (Zhang, Song, Qi, CVPR 2017) are available for "
    "non-commercial research purposes only, and their photos remain under their copyright holders' terms. A model "
    "distilled on these faces inherits that "
    "restriction, as it already inherits the research-use terms of its pretrained teachers' MS-Celeb-derived "
    "training data: it is for research and evaluation, not for commercial deployment unless retrained without "
    "them. The photos are kept outside the repository; only counts, the filter threshold and the command are.")
EXTRA_SEED_OFFSET = 7919  # extra faces draw their noise from another stream than the labelled images


@dataclass(frozen=True)
class Split:
    """Training images (with labels) and evaluation pairs; no training identity appears in an eval fold."""

    eval_folds: tuple[int, ...]
    train_images: list[str]
    train_labels: list[int]
    identities: list[str]  # class index -> identity name
    eval_pairs: list[Pair]
    eval_identities: frozenset[str] = field(default_factory=frozenset)

    @property
    def num_classes(self) -> int:
        return len(self.identities)


def identity_of(path: str) -> str:
    return path.split("/")[0]


def make_split(lfw: Path, eval_folds: tuple[int, ...] = DEFAULT_EVAL_FOLDS, min_images: int = 1,
               max_identities: int | None = None, max_images_per_identity: int | None = None) -> Split:
    """Identity-disjoint split. Optional limits (for CPU-sized runs) keep the identities with the most images
    (ties by name) and the first images of each, deterministically."""
    pairs = read_pairs(lfw)
    eval_pairs = [p for p in pairs if p.fold in eval_folds]
    excluded = {identity_of(path) for p in eval_pairs for path in (p.left, p.right)}
    by_id: dict[str, list[str]] = {}
    for person in sorted(lfw.iterdir()):
        if person.is_dir() and person.name not in excluded:
            images = sorted(str(p.relative_to(lfw)) for p in person.glob("*.jpg"))
            if len(images) >= min_images:
                by_id[person.name] = images[:max_images_per_identity] if max_images_per_identity else images
    names = sorted(by_id)
    if max_identities is not None:
        names = sorted(sorted(names, key=lambda n: (-len(by_id[n]), n))[:max_identities])
    images, labels = [], []
    for label, name in enumerate(names):
        images += by_id[name]
        labels += [label] * len(by_id[name])
    return Split(tuple(eval_folds), images, labels, names, eval_pairs, frozenset(excluded))


@dataclass(frozen=True)
class Augment:
    """Light photometric/geometric jitter on the aligned face (uint8 RGB in, uint8 RGB out)."""

    flip: float = 0.5  # probability of a horizontal flip
    brightness: float = 0.1  # additive, fraction of 255, uniform in [-b, b]
    contrast: float = 0.1  # multiplicative around the mean, uniform in [1-c, 1+c]
    translate: int = 4  # pixels, uniform integer shift in [-t, t] on each axis (edges replicated)

    def __call__(self, face: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = face
        if self.flip and rng.random() < self.flip:
            out = out[:, ::-1]
        if self.translate:
            dx, dy = rng.integers(-self.translate, self.translate + 1, size=2)
            if dx or dy:
                matrix = np.array([[1, 0, dx], [0, 1, dy]], dtype=np.float32)
                out = cv2.warpAffine(np.ascontiguousarray(out), matrix, (out.shape[1], out.shape[0]),
                                     borderMode=cv2.BORDER_REPLICATE)
        if self.brightness or self.contrast:
            x = out.astype(np.float32)
            alpha = 1.0 + rng.uniform(-self.contrast, self.contrast) if self.contrast else 1.0
            beta = 255.0 * rng.uniform(-self.brightness, self.brightness) if self.brightness else 0.0
            x = (x - x.mean()) * alpha + x.mean() + beta
            out = np.clip(np.rint(x), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(out)

    @classmethod
    def from_config(cls, config: dict[str, Any] | Literal[False] | None) -> "Augment | None":
        if config is None or config is False:
            return None
        return cls(**{k: v for k, v in dict(config).items() if k != "enabled"}) if config.get("enabled", True) \
            else None


class TransformedFaces(Dataset[tuple[torch.Tensor, torch.Tensor, int]]):
    """(features float32 [K,14,14], clean RGB uint8 [112,112,3], label) with fresh transform noise per sample."""

    def __init__(self, lfw: Path, images: list[str], labels: list[int], spec: TransformSpec,
                 augment: Augment | None = None, seed: int = 0, cache: bool = True) -> None:
        if len(images) != len(labels):
            raise ValueError("images and labels differ in length")
        self.lfw = Path(lfw)
        self.images = list(images)
        self.labels = list(labels)
        self.spec = spec
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self._cache: dict[int, np.ndarray] | None = {} if cache else None

    def set_epoch(self, epoch: int) -> None:
        """Call at the start of every epoch: the noise and augmentation draws depend on it."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def face(self, index: int) -> np.ndarray:
        if self._cache is None:
            return load_rgb(self.lfw, self.images[index])
        if index not in self._cache:
            self._cache[index] = load_rgb(self.lfw, self.images[index])
        return self._cache[index]

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        rng = self.rng(index)
        face = self.face(index)
        if self.augment is not None:
            face = self.augment(face, rng)
        features = self.features(face, rng)
        return torch.from_numpy(features), torch.from_numpy(np.ascontiguousarray(face)), self.labels[index]

    def features(self, face: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """What the server receives for this (augmented) face: one SDK release (attacks override it)."""
        return apply(face, self.spec, rng).astype(np.float32)


class MixedFaces(ConcatDataset[tuple[torch.Tensor, torch.Tensor, int]]):
    """Labelled images followed by unlabelled extra faces, one epoch counter for both."""

    def set_epoch(self, epoch: int) -> None:
        for part in self.datasets:
            assert isinstance(part, TransformedFaces)
            part.set_epoch(epoch)


def extra_faces_dir() -> Path:
    """PRIVFACE_EXTRA_FACES_DIR, else ../data/celeba-aligned beside the project (absolute)."""
    return Path(os.environ.get(EXTRA_FACES_DIR_ENV, DEFAULT_EXTRA_FACES_DIR)).resolve()


def kept_faces(directory: Path) -> list[str]:
    """The faces a training run may use: DIR/kept.txt (paths relative to DIR); refused when it is missing."""
    listing = Path(directory) / "kept.txt"
    if not listing.is_file():
        raise FileNotFoundError(f"{listing} is missing: run `python -m training_jobs.extra_faces prepare` "
                                f"or point {EXTRA_FACES_DIR_ENV} at its output")
    return [line for line in listing.read_text().splitlines() if line.strip()]


def training_faces(lfw: Path, split: Split, spec: TransformSpec, augment: Augment | None, seed: int,
                   extra: bool | str = False) -> TransformedFaces | MixedFaces:
    """The training set: the split's labelled images, plus (extra: true, or a folder) the unlabelled faces."""
    labelled = TransformedFaces(lfw, split.train_images, split.train_labels, spec, augment, seed=seed)
    if not extra:
        return labelled
    directory = extra_faces_dir() if extra is True else Path(extra)
    faces = kept_faces(directory)
    if not faces:
        raise ValueError(f"{directory / 'kept.txt'} lists no faces")
    unlabelled = TransformedFaces(directory, faces, [UNLABELLED] * len(faces), spec, augment,
                                  seed=seed + EXTRA_SEED_OFFSET)
    return MixedFaces([labelled, unlabelled])
