"""What an attacker may train on, and what it is scored on.

The attacker is the server (or anyone who sees the features): it may use any public faces, so it trains on
every LFW identity outside the evaluation folds (the same training split as the models, `make_split`), with
the SDK's exact transform and a FRESH noise draw per sample and epoch (`TransformedFaces`). It is scored on
images of identities of folds 6-10 only, and `attacker_split` refuses (AssertionError) any split that would
let it see one of them.

Noise here simulates the SDK's: it protects no real data, so a seeded numpy generator (reproducible runs) is
the right tool; the SDK itself draws its noise as `inference.transform` documents.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inference.lfw import load_many
from inference.transform import TransformSpec, apply
from training_jobs.datasets import Augment, Split, TransformedFaces, identity_of, make_split
from training_jobs.evaluate import heldout_pairs, identification_split

EVAL_FOLDS = (6, 7, 8, 9, 10)
FLIP_ONLY = Augment(flip=0.5, brightness=0.0, contrast=0.0, translate=0)


def check_disjoint(train_images: list[str], held_out: set[str] | frozenset[str]) -> None:
    """Raise AssertionError if any training image belongs to a held-out identity."""
    leaked = {identity_of(path) for path in train_images} & set(held_out)
    assert not leaked, f"attacker training would see held-out identities: {sorted(leaked)[:5]}"


def attacker_split(lfw: Path, max_identities: int | None = None,
                   max_images_per_identity: int | None = None) -> Split:
    """The training split (identities outside folds 6-10), checked against the folds' identities."""
    split = make_split(lfw, EVAL_FOLDS, max_identities=max_identities,
                       max_images_per_identity=max_images_per_identity)
    held = {identity_of(path) for p in heldout_pairs(lfw, EVAL_FOLDS) for path in (p.left, p.right)}
    check_disjoint(split.train_images, held)
    return split


class FixedSubsets:
    """A seeded generator whose channel rankings are fixed, given or drawn on first use and then repeated: the SDK's
    pinned subsets (`inference.transform.PinnedSubsetNoise`) as attacks and studies simulate them; noise stays
    fresh from the generator."""

    def __init__(self, rng: np.random.Generator, rankings: np.ndarray | None = None) -> None:
        self.rng, self.rankings = rng, rankings

    def laplace(self, loc: float, scale: Any) -> np.ndarray:
        draws: np.ndarray = self.rng.laplace(loc, scale)
        return draws

    def normal(self, loc: float, scale: Any) -> np.ndarray:
        draws: np.ndarray = self.rng.normal(loc, scale)
        return draws

    def random(self, size: tuple[int, ...]) -> np.ndarray:
        if self.rankings is None:
            self.rankings = self.rng.random(size)
        if tuple(size) != self.rankings.shape:
            raise ValueError(f"rankings for {self.rankings.shape}, asked for {tuple(size)}")
        return self.rankings


def merged_releases(faces: np.ndarray, spec: TransformSpec, rng: np.random.Generator, releases: int,
                    pinned: bool = False) -> np.ndarray:
    """What a server holds after the SAME photo(s) [..., 112, 112, 3] were sent `releases` times (a retry, an app
    that sends a photo on every login): each release has fresh noise and, for a random-subset spec, a fresh subset
    (`pinned`: the same subset every time, as the SDK sends it). The attacker averages each channel over the
    releases that carry it (zeros where none does): more channels and less noise than one release.
    float32 [..., K, 14, 14]."""
    source = FixedSubsets(rng) if pinned else rng
    stack = np.stack([apply(faces, spec, source).astype(np.float32) for _ in range(releases)])
    carried = (stack != 0).any(axis=(-2, -1))  # [releases, ..., K]
    merged: np.ndarray = (stack.sum(axis=0) / np.maximum(carried.sum(axis=0), 1)[..., None, None]).astype(np.float32)
    return merged


class MergedReleases(TransformedFaces):
    """Training samples as `merged_releases` of each augmented face: the attacker trains on what it will see."""

    def __init__(self, *args: Any, releases: int = 1, pinned: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.releases, self.pinned = releases, pinned

    def features(self, face: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return merged_releases(face, self.spec, rng, self.releases, self.pinned)


def training_faces(lfw: Path, spec: TransformSpec, seed: int = 0, max_identities: int | None = None,
                   max_images_per_identity: int | None = None, releases: int = 1,
                   pinned: bool = False) -> TransformedFaces:
    """(features, clean face, label) samples of the training identities, flipped at random, fresh noise (and a
    fresh channel subset for a random-subset spec); with `releases` > 1, each sample merges that many releases."""
    split = attacker_split(lfw, max_identities, max_images_per_identity)
    if releases == 1:
        return TransformedFaces(lfw, split.train_images, split.train_labels, spec, FLIP_ONLY, seed)
    return MergedReleases(lfw, split.train_images, split.train_labels, spec, FLIP_ONLY, seed, releases=releases,
                          pinned=pinned)


def normaliser(spec: TransformSpec) -> torch.Tensor:
    """Per-channel scale [K, 1, 1] that brings every NOISY feature plane to about unit std: sqrt(signal variance +
    noise variance). The attacker knows the spec, so a channel an allocated spec drowns in noise reaches it at unit
    scale too, not as huge values that slow its training (which would flatter the allocation, not measure it)."""
    scales = spec.noise_scales()
    noise_variance = 2.0 * scales ** 2 if spec.mechanism == "laplace" else scales ** 2
    return torch.tensor(np.sqrt(np.square(spec.channel_std) + noise_variance), dtype=torch.float32).view(-1, 1, 1)


def to_unit(faces: torch.Tensor) -> torch.Tensor:
    """RGB uint8 [B, 112, 112, 3] -> float [B, 3, 112, 112] in [0, 1]."""
    return faces.permute(0, 3, 1, 2).float() / 255.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float [B, 3, 112, 112] in [0, 1] (clamped) -> RGB uint8 [B, 112, 112, 3]."""
    return (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


@dataclass(frozen=True)
class ProbeSet:
    """Held-out identification set: a clean gallery (one image per identity) and probes of the same people."""

    gallery_paths: list[str]
    probe_paths: list[str]
    gallery_faces: np.ndarray
    probe_faces: np.ndarray

    @property
    def gallery_ids(self) -> list[str]:
        return [identity_of(p) for p in self.gallery_paths]

    @property
    def probe_ids(self) -> list[str]:
        return [identity_of(p) for p in self.probe_paths]

    def probe_features(self, spec: TransformSpec, seed: int = 0, releases: int = 1, pinned: bool = False) -> np.ndarray:
        """The SDK transform of every probe, one seeded noise draw (and channel subset) each, the same for every
        attack; `releases` > 1 merges that many releases of each probe (`merged_releases`)."""
        rng = np.random.default_rng(seed)
        if releases == 1:
            return apply(self.probe_faces, spec, rng).astype(np.float32)
        return merged_releases(self.probe_faces, spec, rng, releases, pinned)


def probe_set(lfw: Path, max_probes: int | None = 1000, seed: int = 0,
              max_identities: int | None = None) -> ProbeSet:
    """Images of the folds 6-10 pairs; identities with >= 2 of them; first image = gallery, rest = probes
    (a seeded subset of `max_probes`, the same as `training_jobs.leakage`)."""
    images = sorted({path for p in heldout_pairs(lfw, EVAL_FOLDS) for path in (p.left, p.right)})
    gallery, probes = identification_split(images)
    if max_identities is not None:
        keep = {identity_of(p) for p in gallery[:max_identities]}
        gallery = [p for p in gallery if identity_of(p) in keep]
        probes = [p for p in probes if identity_of(p) in keep]
    if max_probes is not None and max_probes < len(probes):
        chosen = np.sort(np.random.default_rng(seed).choice(len(probes), max_probes, replace=False))
        probes = [probes[i] for i in chosen]
    return ProbeSet(gallery, probes, load_many(lfw, gallery), load_many(lfw, probes))
