"""Federated MixUp and the update-inversion attack (issue 11): real faces, the real served model, no Flower.

- MixUp: shapes, weights on the floored simplex, k capped by the batch, the adaptive strategy network learns
  (gradient ascent raises the recognition loss it is trained against), a device's round with MixUp trains.
- Attack, on one device's unprotected single-photo update (the real AdamW step of `train_local`): the observed
  gradient signs prefer the true features over the attacker's start and the inversion descends; the class
  vector in the update identifies its owner among 8 people from another photo.
- Job params: `mixup: {k, adaptive}` validated (422 invalid-job-params) and passed to `simulate`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from app.problems import Problem
from app.services.federated_job import FederatedParams, command, validate_params
from app.settings import GatewaySettings
from inference.lfw import load_many
from inference.mobilefacenet import load_pretrained
from inference.transform import PRESETS, apply
from training_jobs.evaluate import pixel_input
from training_jobs.federated.inversion import (CLASS, InversionConfig, ObservedUpdate, client_gradients, invert_update,
                                              sign_mismatch)
from training_jobs.federated.local import LocalConfig, initial_class_vector, train_local
from training_jobs.federated.mixup import Mixer, MixupConfig, dirichlet_weights, mix, mix_indices
from training_jobs.federated.params import build_base_model, freeze_except, get_arrays, set_arrays, travelling_names
from training_jobs.federated.population import make_population
from tests.federated_data import LFW, SHARED, needs_data, one_thread  # noqa: F401  (one_thread: module fixture)

SPEC = PRESETS["dct8-v0"](64.0)


@pytest.fixture(scope="module")
def population():
    return make_population(LFW, 8, min_images=4, max_images=4)


@pytest.fixture(scope="module")
def faces(population) -> np.ndarray:
    return load_many(LFW, list(population.clients[0].images))


def test_dirichlet_weights_sum_to_one_above_the_floor_and_mixes_use_distinct_photos():
    generator = torch.Generator().manual_seed(0)
    weights = dirichlet_weights(50, 3, generator, floor=0.5)
    assert weights.shape == (50, 3)
    assert torch.allclose(weights.sum(1), torch.ones(50), atol=1e-6)
    assert weights.min() >= 0.5 / 3 - 1e-6 and weights.max() <= 1 - 2 * 0.5 / 3 + 1e-6
    assert weights.std() > 0.05  # random, not uniform
    indices = mix_indices(5, 3, generator)
    assert indices.shape == (5, 3)
    assert all(len(set(row.tolist())) == 3 for row in indices)
    assert sorted(indices.flatten().tolist()) == sorted(list(range(5)) * 3)  # every photo in k mixes


def test_mix_is_the_weighted_sum_of_features_and_pixels():
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(4, SPEC.num_channels, 14, 14, generator=generator)
    pixels = np.random.default_rng(1).integers(0, 256, (4, 112, 112, 3), dtype=np.uint8)
    indices = mix_indices(4, 2, generator)
    weights = dirichlet_weights(4, 2, generator, 0.5)
    mixed, mixed_pixels = mix(features, pixels, indices, weights)
    assert mixed.shape == features.shape and mixed_pixels.shape == (4, 112, 112, 3)
    i, (a, b) = 2, indices[2].tolist()
    assert torch.allclose(mixed[i], weights[i, 0] * features[a] + weights[i, 1] * features[b], atol=1e-5)
    expected = weights[i, 0].item() * pixels[a].astype(np.float32) + weights[i, 1].item() * pixels[b]
    assert np.allclose(mixed_pixels[i], expected, atol=1e-3)


def test_k_is_capped_by_the_batch_and_a_single_photo_is_not_mixed():
    mixer = Mixer(MixupConfig(4), SPEC.num_channels, seed=0)
    features = torch.randn(3, SPEC.num_channels, 14, 14)
    pixels = np.zeros((3, 112, 112, 3), dtype=np.uint8)
    mixed, _ = mixer(features, pixels)
    assert mixed.shape == features.shape
    assert mixer.last_weights is not None and mixer.last_weights.shape == (3, 3)
    one, _ = Mixer(MixupConfig(4), SPEC.num_channels, seed=0)(features[:1], pixels[:1])
    assert torch.equal(one, features[:1])
    with pytest.raises(ValueError):
        MixupConfig(1)


def test_adaptive_strategy_network_updates_towards_a_higher_recognition_loss():
    mixer = Mixer(MixupConfig(3, adaptive=True, strategy_steps=20), SPEC.num_channels, seed=0)
    assert mixer.strategy is not None
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(6, SPEC.num_channels, 14, 14, generator=generator) * torch.linspace(0.2, 3, 6).view(6, 1, 1, 1)
    pixels = np.zeros((6, 112, 112, 3), dtype=np.uint8)
    target = torch.randn(SPEC.num_channels, 14, 14, generator=generator)

    def loss_fn(mixed: torch.Tensor, _pixels: np.ndarray) -> torch.Tensor:  # a stand-in recognition loss
        return (mixed - target).pow(2).mean()

    indices = mix_indices(6, 3, torch.Generator().manual_seed(3))
    before = {name: p.detach().clone() for name, p in mixer.strategy.named_parameters()}
    with torch.no_grad():
        loss_before = loss_fn(mix(features, pixels, indices, mixer.weights(features, indices))[0], pixels)
    mixer.adapt(features, pixels, indices, loss_fn)
    assert any(not torch.equal(before[n], p) for n, p in mixer.strategy.named_parameters())
    with torch.no_grad():
        weights = mixer.weights(features, indices)
        loss_after = loss_fn(mix(features, pixels, indices, weights)[0], pixels)
    assert loss_after > loss_before  # ascent: the strategy makes the mixes harder
    assert torch.allclose(weights.sum(1), torch.ones(6), atol=1e-6) and weights.min() >= 0.5 / 3 - 1e-6


@needs_data
@pytest.mark.parametrize("adaptive", [False, True])
def test_a_device_round_with_mixup_trains_the_model(faces, adaptive):
    model = build_base_model(SPEC, SHARED)
    names = travelling_names(model, "whole")
    freeze_except(model, names)
    before = get_arrays(model, names)
    teacher = load_pretrained(SHARED).requires_grad_(False).eval()
    result = train_local(model, teacher, faces, SPEC, None, LocalConfig(mixup_k=3, mixup_adaptive=adaptive),
                         np.random.default_rng(0))
    after = get_arrays(model, names)
    assert np.isfinite(result.loss) and result.num_examples == 4
    assert any(not np.array_equal(before[n], after[n]) for n in names)


def single_photo_update(photo: np.ndarray, class_vector: np.ndarray | None):
    """One device round on one photo, as train_local runs it (no augmentation, so the test can replay the noise):
    the published model (parameters restored), the observed update, the true features and the device's result."""
    model = build_base_model(SPEC, SHARED)
    names = travelling_names(model, "whole")
    freeze_except(model, names)
    published = get_arrays(model, names)
    teacher = load_pretrained(SHARED).requires_grad_(False).eval()
    local = LocalConfig(batch_size=1)
    sent = class_vector if class_vector is not None else initial_class_vector(model, photo, SPEC,
                                                                               np.random.default_rng(8))
    result = train_local(model, teacher, photo, SPEC, sent, local, np.random.default_rng(5), augment=None)
    update = ObservedUpdate(published, get_arrays(model, names), sent, result.class_vector, 1)
    replay = np.random.default_rng(5)
    replay.permutation(1)  # train_local's batch order, then its noise draw
    true = apply(photo, SPEC, replay).astype(np.float32)
    set_arrays(model, published)
    return model, teacher, names, local, update, true


@needs_data
def test_the_observed_signs_single_out_the_true_features_and_the_inversion_descends(population, faces):
    """The attack's objective must prefer the photo's true (noised) features and teacher embedding over the
    attacker's start (the mean of other people's features), and its optimisation must lower it. Whether the
    optimum is reached within a CPU budget is measured, not asserted (docs/federated.md)."""
    class_vector = np.random.default_rng(4).standard_normal(128).astype(np.float32)
    class_vector /= np.linalg.norm(class_vector)
    model, teacher, names, local, update, true = single_photo_update(faces[:1], class_vector)
    observed = update.signs()
    signs = [observed[n] for n in names] + [observed[CLASS]]
    others = load_many(LFW, [path for client in population.clients[1:] for path in client.images])
    prior = apply(others, SPEC, np.random.default_rng(7)).astype(np.float32).mean(0)
    w = torch.as_tensor(class_vector)
    with torch.no_grad():
        true_teacher = teacher(pixel_input(faces[:1]))
    at_truth = sign_mismatch(client_gradients(model, names, torch.from_numpy(true), true_teacher, w, local, False),
                             signs).item()
    at_start = sign_mismatch(client_gradients(model, names, torch.from_numpy(prior[None]), w[None], w, local,
                                              False), signs).item()
    assert at_truth < 0.5 * at_start, (at_truth, at_start)
    recovered = invert_update(model, update, SPEC, local, InversionConfig(steps=TEST_STEPS, seed=0), prior=prior)
    assert recovered.losses[-1] < recovered.losses[0]
    assert recovered.features.shape == (1, *SPEC.shape)


@needs_data
def test_the_class_vector_of_a_single_photo_update_identifies_its_owner(population):
    """Model + class vector: the class vector a device sends back (in clear, FedAvg and SecAgg+ alike) is
    closest to the published model's embedding of ANOTHER photo of its owner, among 8 people."""
    photos = [load_many(LFW, list(client.images[:2])) for client in population.clients]
    model, _, _, _, update, _ = single_photo_update(photos[0][:1], None)
    gallery = np.stack([p[1] for p in photos])  # second photo of each person: never trained on
    with torch.inference_mode():
        embedded = model(torch.from_numpy(apply(gallery, SPEC, np.random.default_rng(9)).astype(np.float32)))
    scores = embedded.numpy() @ update.class_after
    assert int(np.argmax(scores)) == 0, scores
    assert scores[0] - np.delete(scores, 0).max() > 0.05, scores


TEST_STEPS = 10


@pytest.mark.parametrize("mixup, detail", [
    ({"k": 1}, "mixup.k"), ({"k": 9}, "mixup.k"), ({"k": "3"}, "mixup.k"), ({"k": 3, "alpha": 1}, "mixup.alpha"),
    ({"k": 3, "adaptive": "yes"}, "mixup.adaptive"), ({"adaptive": True}, "mixup.k"), (3, "mixup"),
    ({"k": 5}, "max_images"),
])
def test_mixup_job_params_are_validated(mixup, detail):
    with pytest.raises(Problem) as caught:
        validate_params({"mixup": mixup, "max_images": 4})
    assert caught.value.status == 422 and caught.value.slug == "invalid-job-params"
    assert detail in caught.value.detail


def test_mixup_job_params_reach_the_simulate_command(tmp_path: Path):
    settings = GatewaySettings()
    params = FederatedParams.model_validate(validate_params({"mixup": {"k": 3, "adaptive": True}}))
    cmd = command(settings, params, "fed-x", None, tmp_path)
    assert cmd[cmd.index("--mixup-k") + 1] == "3" and "--mixup-adaptive" in cmd
    plain = command(settings, FederatedParams.model_validate(validate_params({})), "fed-x", None, tmp_path)
    assert "--mixup-k" not in plain
    assert validate_params({})["mixup"] is None


def test_the_inversion_bench_imports_in_the_federated_venv():
    """scripts/install_federated.sh installs scipy, which training_jobs.leakage (the bench's PSNR/SSIM) needs:
    the bench's module imports in .venv-federated, not only in the gateway venv."""
    import os
    import subprocess

    from common.paths import PROJECT_ROOT

    python = Path(os.environ.get("PRIVFACE_TEST_FEDERATED_PYTHON", PROJECT_ROOT / ".venv-federated" / "bin" / "python"))
    if not python.exists():
        pytest.skip("no .venv-federated: run scripts/install_federated.sh (make test does)")
    proc = subprocess.run([str(python), "-c", "import training_jobs.federated.inversion_bench, scipy"],
                          cwd=PROJECT_ROOT, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
