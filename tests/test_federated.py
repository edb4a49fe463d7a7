"""Federated retraining (issue 11): client isolation, FedAvg aggregation, a real 2-round Flower simulation.

Flower (flwr 1.41) lives only in .venv-federated (scripts/install_federated.sh; docs/federated.md says why).
In the gateway's venv the Flower-free tests run directly and `test_flower_suite_in_federated_venv` runs this
whole file again in .venv-federated, in a subprocess, so the default test command really runs them.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.lfw import lfw_dir, shared_dir
from inference.mobilefacenet import WEIGHTS_SUBPATH
from training_jobs.federated.population import ClientData, IsolationError, Population, make_population
from training_jobs.federated.spreadout import spread_out

ROOT = Path(__file__).resolve().parents[1]
FEDERATED_PYTHON = ROOT / ".venv-federated" / "bin" / "python"
HAVE_FLWR = importlib.util.find_spec("flwr") is not None
SHARED = shared_dir()
LFW = lfw_dir(SHARED)
HAVE_DATA = (LFW / "pairs.txt").exists() and (SHARED / WEIGHTS_SUBPATH).exists()
needs_data = pytest.mark.skipif(not HAVE_DATA, reason=f"aligned LFW or MobileFaceNet absent under {SHARED}")
needs_flwr = pytest.mark.skipif(not HAVE_FLWR, reason="flwr is only in .venv-federated: run by "
                                "test_flower_suite_in_federated_venv")


@pytest.fixture(scope="module", autouse=True)
def one_thread():  # local, not tests.conftest's: this module also runs in .venv-federated with --noconftest
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --- Flower-free: population isolation and the spread-out regulariser ----------------------------

@needs_data
def test_each_client_holds_one_training_identity_only():
    population = make_population(LFW, 40, min_images=2, max_images=4)
    names = [c.identity for c in population.clients]
    assert len(set(names)) == 40
    for data in population.clients:
        assert len(data.images) >= 2
        assert {path.split("/")[0] for path in data.images} == {data.identity}
        assert data.identity not in population.held_out
    assert population.held_out, "folds 6-10 identities must be known to be refused"


def test_a_client_with_a_foreign_photo_or_a_held_out_identity_is_refused():
    foreign = ClientData("Alice", ("Alice/Alice_0001.jpg", "Bob/Bob_0001.jpg"))
    with pytest.raises(IsolationError, match="foreign"):
        foreign.check()
    with pytest.raises(IsolationError, match="held-out"):
        Population((ClientData("Carol", ("Carol/Carol_0001.jpg",)),), frozenset({"Carol"})).client(0)
    with pytest.raises(IsolationError, match="share an identity"):
        Population((ClientData("Dan", ("Dan/Dan_0001.jpg",)), ClientData("Dan", ("Dan/Dan_0002.jpg",))),
                   frozenset()).check()


def test_spread_out_pushes_class_vectors_apart_and_keeps_them_unit():
    rng = np.random.default_rng(0)
    base = rng.normal(size=128)
    vectors = np.stack([base + 0.1 * rng.normal(size=128) for _ in range(4)]).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    spread = spread_out(vectors, margin=0.0, lr=0.1, steps=20)
    before = (vectors @ vectors.T)[np.triu_indices(4, 1)]
    after = (spread @ spread.T)[np.triu_indices(4, 1)]
    assert np.allclose(np.linalg.norm(spread, axis=1), 1.0, atol=1e-5)
    assert after.max() < before.min()


# --- the same tests again in the federated venv ---------------------------------------------------

@pytest.mark.skipif(HAVE_FLWR, reason="flwr importable here: the Flower tests of this file run directly")
def test_flower_suite_in_federated_venv():
    if not FEDERATED_PYTHON.exists():
        pytest.skip("no .venv-federated: run scripts/install_federated.sh (make test does)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([str(FEDERATED_PYTHON), "-m", "pytest", "-q", "--noconftest", "-p", "no:cacheprovider",
                           "-k", "not flower_suite", str(Path(__file__))], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, proc.stdout[-2000:]  # every Flower test really ran


# --- Flower: aggregation and a real simulation ----------------------------------------------------

def _reply(instruction, arrays: dict[str, np.ndarray], examples: int):
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": examples, "loss": float(examples)})})
    return Message(content, reply_to=instruction)


@needs_flwr
def test_fedfaceavg_aggregates_the_weighted_mean_and_keeps_class_vectors_per_client(monkeypatch):
    from flwr.app import Array, ArrayRecord, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity
    from training_jobs.federated.client_app import CLASS_KEY
    from training_jobs.federated.server_app import FedFaceAvg

    for attribute in ("_run_id", "_node_id", "_task_id"):  # what a ServerApp process has set before messaging
        monkeypatch.setattr(TaskIdentity, attribute, 1)
    rng = np.random.default_rng(1)
    strategy = FedFaceAvg(min_train_nodes=3, min_available_nodes=3)
    examples = [1, 2, 5]
    sent = {n: {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32),
                CLASS_KEY: rng.normal(size=8).astype(np.float32)} for n in (11, 12, 13)}
    replies = []
    for node, count in zip(sent, examples):
        instruction = Message(RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros((3, 4), np.float32))})}),
                              dst_node_id=node, message_type=MessageType.TRAIN)
        replies.append(_reply(instruction, sent[node], count))
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert set(arrays) == {"w", "b"}, "class vectors must never be averaged"
    for key in ("w", "b"):
        expected = sum(c * sent[n][key] for n, c in zip(sent, examples)) / sum(examples)
        np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-6, atol=1e-6)
    assert metrics["loss"] == pytest.approx(sum(c * c for c in examples) / sum(examples))
    assert sorted(strategy.class_vectors) == [11, 12, 13]
    for node in sent:  # kept per client, spread out and normalised, not averaged
        assert np.linalg.norm(strategy.class_vectors[node]) == pytest.approx(1.0, abs=1e-5)
    assert strategy.rounds[-1]["replied"] == 3


@needs_flwr
@needs_data
def test_client_round_refuses_parameters_it_does_not_know_and_trains_only_what_travels():
    import json

    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
    from inference.lfw import load_many
    from inference.transform import spec_v0
    from training_jobs.federated.client_app import CLASS_KEY, train_round
    from training_jobs.federated.params import build_base_model, get_arrays, travelling_names

    spec = spec_v0()
    model = build_base_model(spec, SHARED)
    names = travelling_names(model, "adapter-tail")
    arrays = get_arrays(model, names)
    config = ConfigRecord({"transform": json.dumps(spec.to_dict()), "seed": 0, "server-round": 1, "epochs": 1})
    faces = load_many(LFW, list(make_population(LFW, 1).clients[0].images))
    bad = RecordDict({"arrays": ArrayRecord({"backbone.nope": Array(np.zeros(3, np.float32))}), "config": config})
    with pytest.raises(ValueError, match="unexpected parameter"):
        train_round(bad, faces, SHARED)
    good = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}), "config": config})
    reply = train_round(good, faces, SHARED)
    returned = reply["arrays"]
    assert set(returned) == set(names) | {CLASS_KEY}
    assert any(not np.array_equal(returned[n].numpy(), arrays[n]) for n in names)
    assert reply["metrics"]["num-examples"] == len(faces)


@needs_flwr
@needs_data
def test_two_round_simulation_with_three_clients_runs_and_changes_the_model():
    from inference.transform import spec_v0
    from training_jobs.federated.params import build_base_model, get_arrays, travelling_names
    from training_jobs.federated.server_app import ServerSettings
    from training_jobs.federated.simulate import simulate

    spec = spec_v0()
    population = make_population(LFW, 3, min_images=2, max_images=2)
    settings = ServerSettings(str(SHARED), spec.to_dict(), "adapter-tail", rounds=2, clients_per_round=3,
                              num_clients=3, seed=0, local={"epochs": 1, "batch-size": 2})
    log = simulate(population, settings, LFW, heldout=None)
    assert [r["replied"] for r in log["rounds"]] == [3, 3]
    assert all(r["failed"] == 0 and r["bytes_up_per_client"] > 1_000_000 for r in log["rounds"])
    assert log["class_vectors"] == 3
    model = build_base_model(spec, SHARED)
    initial = get_arrays(model, travelling_names(model, "adapter-tail"))
    final = log["final_arrays"]
    assert set(final) == set(initial)
    moved = max(float(np.abs(final[k] - initial[k]).max()) for k in initial)
    assert moved > 1e-6, "two rounds of FedAvg must change the global model"
