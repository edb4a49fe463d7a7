"""Federated MixUp and the update-inversion attack (issue 11): real faces, the real served model, no Flower.

- MixUp: shapes, weights on the floored simplex, k capped by the batch, the adaptive strategy network learns
  (gradient ascent raises the recognition loss it is trained against), a device's round with MixUp trains.
- Attack: from one device's unprotected single-photo update (the real AdamW step of `train_local`), gradient
  inversion recovers feature maps closer to the true ones than its own start and than random maps.
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
from inference.lfw import lfw_dir, load_many, shared_dir
from inference.mobilefacenet import WEIGHTS_SUBPATH, load_pretrained
from inference.transform import PRESETS, apply
from training_jobs.federated.inversion import InversionConfig, ObservedUpdate, best_cosines, invert_update
from training_jobs.federated.local import LocalConfig, train_local
from training_jobs.federated.mixup import Mixer, MixupConfig, dirichlet_weights, mix, mix_indices
from training_jobs.federated.params import build_base_model, freeze_except, get_arrays, set_arrays, travelling_names
from training_jobs.federated.population import make_population

SHARED = shared_dir()
LFW = lfw_dir(SHARED)
HAVE_DATA = (LFW / "pairs.txt").exists() and (SHARED / WEIGHTS_SUBPATH).exists()
needs_data = pytest.mark.skipif(not HAVE_DATA, reason=f"aligned LFW or MobileFaceNet absent under {SHARED}")
SPEC = PRESETS["dct8-v0"](64.0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


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


@needs_data
def test_inversion_recovers_features_of_an_unprotected_single_photo_update(population, faces):
    """The attack must get closer to the photo's true (noised) features than its start (the mean of other
    people's features: what the attacker knows without the update) and than random maps."""
    photo = faces[:1]
    model = build_base_model(SPEC, SHARED)
    names = travelling_names(model, "whole")
    freeze_except(model, names)
    published = get_arrays(model, names)
    teacher = load_pretrained(SHARED).requires_grad_(False).eval()
    class_vector = np.random.default_rng(4).standard_normal(128).astype(np.float32)
    class_vector /= np.linalg.norm(class_vector)
    local = LocalConfig(batch_size=1)
    result = train_local(model, teacher, photo, SPEC, class_vector, local, np.random.default_rng(5), augment=None)
    update = ObservedUpdate(published, get_arrays(model, names), class_vector, result.class_vector, 1)
    replay = np.random.default_rng(5)
    replay.permutation(1)  # train_local's batch order, then its noise draw
    true = apply(photo, SPEC, replay).astype(np.float32)
    set_arrays(model, published)
    others = load_many(LFW, [path for client in population.clients[1:] for path in client.images])
    prior = apply(others, SPEC, np.random.default_rng(7)).astype(np.float32).mean(0)
    start = invert_update(model, update, SPEC, local, InversionConfig(steps=0, seed=0), prior=prior)
    recovered = invert_update(model, update, SPEC, local, InversionConfig(steps=TEST_STEPS, seed=0), prior=prior)
    random_maps = np.random.default_rng(6).standard_normal((20, *SPEC.shape)) * np.asarray(SPEC.channel_std).reshape(1, -1, 1, 1)
    got = best_cosines(recovered.features, true, SPEC, unit=False)[0]
    assert recovered.losses[-1] < recovered.losses[0]
    assert got > best_cosines(start.features, true, SPEC, unit=False)[0] + MARGIN
    assert got > best_cosines(random_maps, true, SPEC, unit=False)[0] + MARGIN


TEST_STEPS = 30
MARGIN = 0.02


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
