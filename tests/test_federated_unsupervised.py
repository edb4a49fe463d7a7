"""Unsupervised federated mode and GAN impostor negatives (issue 11): real LFW photos, the real served model.

Flower-free (pure torch): these run in the gateway venv and in .venv-federated alike.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from app.problems import Problem
from training_jobs.datasets import Augment
from app.services.federated_job import FederatedParams, command, validate_params
from app.settings import GatewaySettings
from inference.lfw import load_many
from inference.mobilefacenet import load_pretrained
from inference.transform import PRESETS, clipped, spec_v0
from training_jobs.federated.impostors import (DEFAULT_CHECKPOINT, FeatureGenerator, ImpostorSource, load_generator,
                                               negative_margin_loss, save_generator, source_from_config, to_units,
                                               train_gan)
from training_jobs.federated.local import LocalConfig, raw_embedding, train_local
from training_jobs.federated.params import build_base_model, freeze_except, travelling_names
from training_jobs.federated.population import ClientData, IsolationError, Population, make_population
from training_jobs.federated.unsupervised import FrozenGlobal, cosine_distance, two_views
from tests.federated_data import LFW, SHARED, needs_data, one_thread  # noqa: F401  (one_thread: module fixture)



def _client_model(spec):
    model = build_base_model(spec, SHARED)
    freeze_except(model, travelling_names(model, "adapter-tail"))
    return model


def _unsupervised_loss(model, start, faces, spec, seed: int = 7) -> float:
    """Agreement + distillation to `start` on fixed views (the same augmentation and noise draws every call)."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for view1, view2 in two_views(faces, spec, Augment(), 4, np.random.default_rng(seed)):
            e1, e2 = raw_embedding(model, view1), raw_embedding(model, view2)
            loss = cosine_distance(e1, e2) + 0.5 * (cosine_distance(e1, start(view1)) + cosine_distance(e2, start(view2)))
            total += float(loss) * len(view1)
            count += len(view1)
    return total / count


@needs_data
def test_unsupervised_local_training_lowers_its_loss_on_a_real_clients_photos_and_returns_no_class_vector():
    spec = spec_v0(64.0)
    client = make_population(LFW, 1, min_images=4, max_images=4).clients[0]
    faces = load_many(LFW, list(client.images))
    model = _client_model(spec)
    start = FrozenGlobal(model)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = _unsupervised_loss(model, start, faces, spec)
    config = LocalConfig(mode="unsupervised", epochs=4)  # the round's defaults otherwise
    result = train_local(model, None, faces, spec, None, config, np.random.default_rng(0))
    after = _unsupervised_loss(model, start, faces, spec)
    assert result.class_vector is None, "the unsupervised mode has no identity to send"
    assert result.num_examples == 4 and result.impostor == 0.0
    assert after < before * 0.8, (before, after)  # measured here: 0.33 -> 0.19
    assert all(torch.equal(p, frozen_before[n]) for n, p in model.named_parameters() if not p.requires_grad)


@needs_data
def test_single_photo_clients_serve_the_unsupervised_mode_and_stay_isolated():
    population = make_population(LFW, 30, min_images=1, max_images=4)
    singles = [c for c in population.clients if len(c.images) == 1]
    assert singles, "the first 30 training identities by name include single-photo ones"
    for data in population.clients:
        assert {path.split("/")[0] for path in data.images} == {data.identity}
        assert data.identity not in population.held_out
    single = singles[0]
    other = population.clients[1] if population.clients[0] is single else population.clients[0]
    with pytest.raises(IsolationError):
        ClientData(single.identity, single.images + other.images[:1]).check(population.held_out)
    held_out = sorted(population.held_out)[0]
    with pytest.raises(IsolationError):
        Population((single, ClientData(held_out, (f"{held_out}/{held_out}_0001.jpg",))), population.held_out).check()
    with pytest.raises(IsolationError):
        Population((single, single), population.held_out).check()


@needs_data
def test_generator_makes_features_of_the_transforms_shape_and_scale_and_its_checkpoint_loads(tmp_path):
    spec = spec_v0(64.0)
    identities = sorted({c.identity for c in make_population(LFW, 300, min_images=1, max_images=1).clients})[200:]
    paths = [f"{name}/{name}_0001.jpg" for name in identities[:64]]
    real = to_units(clipped(load_many(LFW, paths), spec), spec)
    generator, history = train_gan(real, steps=10, batch_size=16, log_every=5)
    assert len(history) == 2 and all(np.isfinite([h["d_loss"], h["g_loss"]]).all() for h in history)
    source = ImpostorSource(generator, spec)
    clean = source.clean(6, np.random.default_rng(0))
    assert clean.shape == (6, *spec.shape)
    bounds = spec.clip_bounds()[:, None, None]
    assert np.all(np.abs(clean) <= bounds + 1e-9) and clean.std() > 0
    noisy = source.sample(6, np.random.default_rng(0))
    assert noisy.dtype == torch.float32 and tuple(noisy.shape) == (6, *spec.shape)
    assert not np.allclose(noisy.numpy(), clean.astype(np.float32)), "the served noise is added"
    path = tmp_path / "gan.pt"
    sha = save_generator(generator, spec, path, {"test": True})
    assert path.stat().st_size < 2_000_000
    loaded = load_generator(path, spec_v0(16.0), sha)  # the noise level does not matter, the transform does
    assert np.allclose(ImpostorSource(loaded, spec).clean(6, np.random.default_rng(0)), clean, atol=1e-6)
    with pytest.raises(ValueError, match="trained for transform"):
        load_generator(path, PRESETS["dct8-low10"](64.0))
    with pytest.raises(ValueError, match="sha256"):
        load_generator(path, spec, "0" * 64)
    assert source_from_config({"negatives": "none"}, spec) is None
    with pytest.raises(ValueError, match="negatives"):
        source_from_config({"negatives": "vae"}, spec)


@needs_data
@pytest.mark.skipif(not DEFAULT_CHECKPOINT.exists(), reason="no committed impostor generator")
def test_the_shipped_generator_loads_for_the_served_transform():
    generator = load_generator(DEFAULT_CHECKPOINT, spec_v0(64.0))
    assert isinstance(generator, FeatureGenerator) and generator.channels == spec_v0(64.0).num_channels
    assert sum(p.numel() for p in generator.parameters()) < 500_000


@needs_data
def test_supervised_impostors_push_the_class_vector_away_from_generated_faces():
    spec = spec_v0(64.0)
    client = make_population(LFW, 1, min_images=4, max_images=4).clients[0]
    faces = load_many(LFW, list(client.images))
    identities = sorted({c.identity for c in make_population(LFW, 300, min_images=1, max_images=1).clients})[200:]
    real = to_units(clipped(load_many(LFW, [f"{n}/{n}_0001.jpg" for n in identities[:32]]), spec), spec)
    source = ImpostorSource(train_gan(real, steps=5, batch_size=16)[0], spec)
    probe = source.sample(16, np.random.default_rng(99))
    teacher = load_pretrained(SHARED).requires_grad_(False).eval()
    config = LocalConfig(epochs=2, impostor_weight=5.0, impostor_margin=0.0, impostors_per_batch=8)
    results = {}
    for name, impostors in (("none", None), ("gan", source)):
        model = _client_model(spec)
        result = train_local(model, teacher, faces, spec, None, config, np.random.default_rng(0),
                             impostors=impostors)
        with torch.no_grad():
            g = raw_embedding(model.eval(), probe)
        results[name] = (result, float(negative_margin_loss(torch.as_tensor(result.class_vector)[None], g, 0.0)))
    assert results["none"][0].impostor == 0.0 and results["gan"][0].impostor > 0.0
    assert results["gan"][1] < results["none"][1], {k: v[1] for k, v in results.items()}


def test_job_params_accept_the_modes_and_negatives_and_refuse_bad_values():
    params = validate_params({"mode": "unsupervised", "negatives": "gan"})
    assert params["mode"] == "unsupervised" and params["negatives"] == "gan"
    assert validate_params({})["negatives"] == "none"
    for bad, field in (({"mode": "self-supervised"}, "mode"), ({"negatives": "vae"}, "negatives"),
                       ({"negatives": 1}, "negatives"), ({"mode": None}, "mode")):
        with pytest.raises(Problem) as caught:
            validate_params(bad)
        assert caught.value.status == 422 and caught.value.slug == "invalid-job-params" and field in caught.value.detail


def test_the_job_command_passes_mode_and_negatives_to_the_run(tmp_path):
    settings = GatewaySettings(federated_python=Path("/venv/bin/python"), model_dir=tmp_path)
    cmd = command(settings, FederatedParams(mode="unsupervised", negatives="gan"), "fed-x", None, tmp_path / "state")
    assert cmd[cmd.index("--mode") + 1] == "unsupervised" and cmd[cmd.index("--negatives") + 1] == "gan"
