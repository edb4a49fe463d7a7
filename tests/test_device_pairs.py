"""training_jobs.device_pairs: held-out pairs scored as one device (both photos release the same channels) and as
two (a subset each), on real LFW photos; a model without subsets is refused in one line."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from inference.lfw import lfw_dir, shared_dir
from inference.transform import spec_low
from training_jobs.device_pairs import pair_scores
from training_jobs.evaluate import HeldoutSet

ROOT = Path(__file__).resolve().parents[1]
LFW = lfw_dir(shared_dir())
needs_lfw = pytest.mark.skipif(not (LFW / "pairs.txt").exists(), reason=f"aligned LFW absent under {LFW}")


def released_as_embedding(features: np.ndarray) -> np.ndarray:
    """A stand-in model whose 'embedding' is which channels carry values: same channels <=> score 1."""
    mask = (np.abs(features).max(axis=(2, 3)) > 0).astype(np.float32)
    normalised: np.ndarray = mask / np.linalg.norm(mask, axis=1, keepdims=True)
    return normalised


@needs_lfw
def test_one_device_pairs_share_their_channels_and_two_devices_do_not():
    heldout = HeldoutSet(LFW, (6,), max_pairs_per_fold=6)
    spec = dataclasses.replace(spec_low(8), random_channels=33)
    one = pair_scores(heldout, spec, released_as_embedding, seed=0, one_device=True)
    two = pair_scores(heldout, spec, released_as_embedding, seed=0, one_device=False)
    assert len(one) == len(two) == 6
    assert np.allclose(one, 1.0) and (two < 0.9).all()  # two random halves of 66 overlap by ~half


def test_a_model_that_releases_every_channel_is_refused_in_one_line():
    done = subprocess.run([sys.executable, "-m", "training_jobs.device_pairs", "--model",
                           str(ROOT / "inference/bundled/v5-balanced")], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1].endswith("its transform dct8-y52c5-lap64 releases every channel")
