"""Pixel mixes of two training faces as extra distillation inputs ("function matching", config `loss.mixed_faces`).

Why: the sealed student copies its pixel teacher to 1 - cos 0.28 on its training faces but only 0.54 on faces it
never saw, and neither more steps, 5x the unlabelled faces nor width 192 moved the held-out figure
(docs/sealed.md). Distillation needs no label, so any image is a valid input: a mix of two faces is a new input
every step, on which the teacher still says what it sees. Matching the teacher on those points of input space
between the training faces is the recipe that made small students generalise in "Knowledge distillation: a good
teacher is patient and consistent" (Beyer et al., 2022); here it is tried on this project's student.

A fraction of each batch is replaced: row i becomes round(lam * face_i + (1 - lam) * face_j) for a random other
row j of the same batch, lam uniform in [0, 1]; its features are the SDK's exact transform of the mixed face (clip,
fresh noise, float16) and its label UNLABELLED (it takes no part in the margin loss). The teacher then embeds the
mixed face like any other. Randomness here is training augmentation, not protection.
"""
from __future__ import annotations

import numpy as np
import torch

from inference.transform import TransformSpec, apply
from training_jobs.losses import UNLABELLED


def mix_batch(features: torch.Tensor, clean: torch.Tensor, labels: torch.Tensor, spec: TransformSpec,
              fraction: float, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features, clean faces, labels) with round(fraction * batch) rows replaced by two-face mixes (new tensors;
    the inputs are not changed). clean: uint8 [B, 112, 112, 3]; features: float32 [B, K, 14, 14]."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"loss.mixed_faces must be in [0, 1], not {fraction}")
    batch = len(labels)
    count = int(round(fraction * batch))
    if count == 0 or batch < 2:
        return features, clean, labels
    rows = rng.choice(batch, count, replace=False)
    partners = (rows + rng.integers(1, batch, count)) % batch  # another row of the batch, never the row itself
    lam = rng.random(count).reshape(-1, 1, 1, 1)
    faces = clean.numpy()
    mixed = np.rint(lam * faces[rows] + (1 - lam) * faces[partners]).astype(np.uint8)
    new_clean, new_features, new_labels = clean.clone(), features.clone(), labels.clone()
    new_clean[rows] = torch.from_numpy(mixed)
    new_features[rows] = torch.from_numpy(apply(mixed, spec, rng).astype(np.float32))
    new_labels[rows] = UNLABELLED
    return new_features, new_clean, new_labels
