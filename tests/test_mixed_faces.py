"""training_jobs/mixed_faces.py: the distillation-only pixel mixes of two training faces, on real LFW faces."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from inference.lfw import lfw_dir, load_many
from inference.transform import PRESETS, apply
from training_jobs.datasets import make_split
from training_jobs.losses import UNLABELLED
from training_jobs.mixed_faces import mix_batch


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    spec = PRESETS["dct8-v0"](64.0)
    split = make_split(lfw_dir())
    faces = load_many(lfw_dir(), split.train_images[:8])
    features = apply(faces, spec, np.random.default_rng(0)).astype(np.float32)
    return torch.from_numpy(features), torch.from_numpy(faces), torch.tensor(split.train_labels[:8])


def test_half_the_rows_become_unlabelled_mixes_of_two_other_faces_and_the_rest_is_untouched(batch):
    features, clean, labels = batch
    spec = PRESETS["dct8-v0"](64.0)
    kept = (features.clone(), clean.clone(), labels.clone())
    new_features, new_clean, new_labels = mix_batch(features, clean, labels, spec, 0.5, np.random.default_rng(1))
    for before, after in zip(kept, (features, clean, labels)):
        assert torch.equal(before, after)  # the inputs are not changed in place
    mixed = (new_labels == UNLABELLED).nonzero().flatten().tolist()
    assert len(mixed) == 4 and all(labels[i] >= 0 for i in range(8))
    same = [i for i in range(8) if i not in mixed]
    assert torch.equal(new_features[same], features[same]) and torch.equal(new_clean[same], clean[same])
    assert torch.equal(new_labels[same], labels[same])
    faces = clean.numpy().astype(np.int16)
    for row in mixed:
        got = new_clean[row].numpy().astype(np.int16)
        # a convex mix of its own face and another row's: within the two, pixel by pixel (rounding: 1 grey level)
        fits = [j for j in range(8) if j != row and np.all(got >= np.minimum(faces[row], faces[j]) - 1)
                and np.all(got <= np.maximum(faces[row], faces[j]) + 1)]
        assert fits, f"row {row} is not a mix of its face and another"
        # its features are the SDK transform of the mixed face: close to the noise-free clip of it
        noise_free = apply(new_clean[row].numpy(), PRESETS["dct8-v0"](None), np.random.default_rng(0))
        assert np.abs(new_features[row].numpy() - noise_free).mean() < np.abs(features[row].numpy() - noise_free).mean()


@pytest.mark.parametrize("fraction, expected", [(0.0, 0), (1.0, 8), (0.25, 2)])
def test_the_fraction_sets_how_many_rows_are_mixed(batch, fraction, expected):
    features, clean, labels = batch
    _, _, new_labels = mix_batch(features, clean, labels, PRESETS["dct8-v0"](64.0), fraction, np.random.default_rng(2))
    assert int((new_labels == UNLABELLED).sum()) == expected


def test_a_fraction_outside_0_1_is_refused(batch):
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        mix_batch(*batch, PRESETS["dct8-v0"](64.0), 1.2, np.random.default_rng(0))
