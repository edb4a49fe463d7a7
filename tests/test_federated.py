"""Federated retraining (issue 11): client isolation, FedAvg aggregation, a real 2-round Flower simulation.

Flower (flwr 1.41) lives only in .venv-federated (scripts/install_federated.sh; docs/federated.md says why).
In the gateway's venv the Flower-free tests run directly and `test_flower_suite_in_federated_venv` runs this
whole file again in .venv-federated, in a subprocess, so the default test command really runs them.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from training_jobs.federated.population import ClientData, IsolationError, Population, make_population
from training_jobs.federated.spreadout import spread_out
from tests import background_suites
from tests.federated_data import LFW, SHARED, needs_data, one_thread  # noqa: F401  (one_thread: module fixture)

ROOT = Path(__file__).resolve().parents[1]
FEDERATED_PYTHON = ROOT / ".venv-federated" / "bin" / "python"
HAVE_FLWR = importlib.util.find_spec("flwr") is not None
needs_flwr = pytest.mark.skipif(not HAVE_FLWR, reason="flwr is only in .venv-federated: run by "
                                "test_flower_suite_in_federated_venv")


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

def test_one_run_owns_a_state_directory_and_another_is_refused_without_touching_it(tmp_path):
    """The deployment runtime's guard against a job submitted twice (worker killed between `flwr run` and run.json):
    the first ServerApp claims the directory, a second run is refused, the owner may claim again after a restart,
    and of many runs racing to claim an empty directory exactly one wins."""
    from concurrent.futures import ThreadPoolExecutor

    from training_jobs.federated import checkpoint

    assert checkpoint.owner(tmp_path / "new") is None
    checkpoint.claim(tmp_path / "job", 7)
    checkpoint.claim(tmp_path / "job", 7)  # the owner's ServerApp restarted
    with pytest.raises(checkpoint.StateDirTaken, match="belongs to Flower run 7; run 8 refuses"):
        checkpoint.claim(tmp_path / "job", 8)
    assert checkpoint.owner(tmp_path / "job") == 7
    assert sorted(p.name for p in (tmp_path / "job").iterdir()) == ["owner.json"], "no temporary file is left"

    def try_claim(run_id: int) -> bool:
        try:
            checkpoint.claim(tmp_path / "race", run_id)
            return True
        except checkpoint.StateDirTaken:
            return False

    with ThreadPoolExecutor(8) as pool:
        won = [run_id for run_id, ok in zip(range(32), pool.map(try_claim, range(32))) if ok]
    assert len(won) == 1 and checkpoint.owner(tmp_path / "race") == won[0]


@pytest.mark.skipif(HAVE_FLWR, reason="flwr importable here: the Flower tests of this file run directly")
def test_flower_suite_in_federated_venv():
    if not FEDERATED_PYTHON.exists():
        pytest.skip("no .venv-federated: run scripts/install_federated.sh (make test does)")
    run = background_suites.outcome("test_flower_suite_in_federated_venv")  # started at collection
    assert run.returncode == 0, run.stdout[-9000:]
    summary = run.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, run.stdout[-2000:]  # every Flower test really ran


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
    assert sorted(strategy.class_vectors) == ["node-11", "node-12", "node-13"]  # no client id in these replies
    for node in sent:  # kept per client, spread out and normalised, not averaged
        assert np.linalg.norm(strategy.class_vectors[f"node-{node}"]) == pytest.approx(1.0, abs=1e-5)


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
    from training_jobs.federated.settings import ServerSettings
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


@needs_flwr
def test_simulate_hands_the_base_model_to_its_own_fields():
    """A job started from a base version (`--base-dir`, what every API federated job passes) must train from that
    version's weights: the path and hash land in base_weights/base_sha256, and round_timeout keeps its default
    (positionally, the path once landed in round_timeout and the hash in base_weights)."""
    from inference.transform import spec_v0
    from training_jobs.federated.simulate import make_parser, server_settings

    args = make_parser().parse_args(["--base-dir", "/versions/v7", "--rounds", "2", "--state-dir", "/state"])
    settings = server_settings(args, SHARED, spec_v0(), (Path("/versions/v7/weights.pt"), "ab" * 32))
    assert (settings.base_weights, settings.base_sha256) == ("/versions/v7/weights.pt", "ab" * 32), settings
    assert settings.round_timeout == 3600.0 and settings.state_dir == "/state" and settings.rounds == 2
    v0 = server_settings(make_parser().parse_args([]), SHARED, spec_v0(), None)
    assert v0.base_weights is None and v0.base_sha256 is None and v0.round_timeout == 3600.0


@needs_flwr
def test_the_exported_candidates_calibration_size_is_an_option_with_a_floor(capsys):
    """`--calibration-images` (the gateway passes PRIVFACE_FEDERATED_CALIBRATION_IMAGES) sets how many images the
    candidate's impostor curve is measured on; below the floor a threshold at FMR 1e-3 has too few pairs."""
    from inference.operating_points import CALIBRATION_IMAGES
    from training_jobs.federated.simulate import make_parser

    assert make_parser().parse_args([]).calibration_images == CALIBRATION_IMAGES
    assert make_parser().parse_args(["--calibration-images", "300"]).calibration_images == 300
    with pytest.raises(SystemExit):
        make_parser().parse_args(["--calibration-images", "99"])
    assert "at least 100, not 99" in capsys.readouterr().err
    assert make_parser().parse_args([]).calibration_faces is None  # LFW's no-fold people
    assert make_parser().parse_args(["--calibration-faces", str(SHARED)]).calibration_faces == SHARED
    with pytest.raises(SystemExit):
        make_parser().parse_args(["--calibration-faces", str(SHARED / "no-such-folder")])
    assert "no-such-folder: not a folder" in capsys.readouterr().err


@needs_flwr
def test_the_devices_learning_rates_reach_the_local_config_only_when_given(capsys):
    """`--lr`/`--adapter-lr` travel in the round's config and become the devices' LocalConfig; left out, the
    config has no such key (a run at the defaults keeps its settings fingerprint, so its saved state resumes)."""
    from inference.transform import spec_v0
    from training_jobs.federated.client_app import local_config
    from training_jobs.federated.local import LocalConfig
    from training_jobs.federated.simulate import make_parser, server_settings

    tuned = server_settings(make_parser().parse_args(["--lr", "5e-5", "--adapter-lr", "1e-5"]), SHARED, spec_v0(), None)
    assert (local_config(tuned.local).lr, local_config(tuned.local).adapter_lr) == (5e-5, 1e-5)
    default = server_settings(make_parser().parse_args([]), SHARED, spec_v0(), None)
    assert "lr" not in default.local and "adapter-lr" not in default.local
    assert local_config(default.local) == LocalConfig(epochs=1, batch_size=4)
    with pytest.raises(SystemExit):
        make_parser().parse_args(["--lr", "0"])
    assert "must be above 0, not 0" in capsys.readouterr().err


def test_the_settings_identity_names_a_face_set_only_when_it_is_not_lfws():
    """A run on another face set (`simulate --faces`) must not resume a state saved by an LFW run, and an LFW run
    must keep the identity it had before the face-set fields existed (its saved states still resume)."""
    from training_jobs.federated.checkpoint import fingerprint
    from training_jobs.federated.settings import ServerSettings

    lfw = ServerSettings("/shared", {"name": "t"})
    assert fingerprint(lfw.identity()) == "ed1de7e62254574d"  # what the code before these fields gave (5dc5229)
    assert fingerprint(ServerSettings("/shared", {"name": "t"}, heldout_folds=[10, 9, 8, 7, 6]).identity()) == (
        "ed1de7e62254574d")  # LFW's folds in another order or as a list are the same run
    assert sorted(lfw.identity()) == ["aggregation", "base_sha256", "base_weights", "clients_per_round", "dp",
                                      "drop_fraction", "local", "num_clients", "rounds", "scope", "secagg", "seed",
                                      "shared", "transform"]
    other = ServerSettings("/shared", {"name": "t"}, faces="/data/celeba-val", heldout_folds=(8, 9, 10))
    assert other.identity()["faces"] == "/data/celeba-val" and other.identity()["heldout_folds"] == (8, 9, 10)
    assert fingerprint(other.identity()) != fingerprint(lfw.identity())
    assert fingerprint(ServerSettings("/shared", {"name": "t"}, heldout_folds=(1, 2)).identity()) != fingerprint(
        lfw.identity())


@needs_flwr  # simulate's parser imports Flower
def test_a_state_saved_with_one_held_out_sample_size_is_not_resumed_with_another(tmp_path: Path):
    """The log a resumed run continues holds its held-out metrics per round: --pairs-per-fold 300 must not extend a
    log measured on 60 pairs per fold. The default keeps the identity it had before the field existed."""
    from training_jobs.federated import checkpoint
    from training_jobs.federated.settings import ServerSettings
    from training_jobs.federated.simulate import make_parser, server_settings
    from inference.transform import PRESETS

    spec = PRESETS["dct8-v0"](64.0)
    def settings(*extra: str) -> ServerSettings:
        return server_settings(make_parser().parse_args(["--state-dir", str(tmp_path), *extra]), SHARED, spec, None)
    assert settings().identity() == settings("--pairs-per-fold", "60").identity()
    assert "heldout_pairs_per_fold" not in settings().identity()
    assert fingerprint_of(settings("--pairs-per-fold", "300")) != fingerprint_of(settings())
    deployment = ServerSettings("/shared", {"name": "t"}, heldout_pairs_per_fold=0)  # no per-round held-out log
    assert fingerprint_of(deployment) == fingerprint_of(ServerSettings("/shared", {"name": "t"}))
    state = checkpoint.RoundState(1, {"w": np.zeros(2)}, log={"rounds": []}, fingerprint=fingerprint_of(settings()))
    checkpoint.save(tmp_path, state)
    assert checkpoint.load(tmp_path, fingerprint_of(settings())) is not None
    with pytest.raises(checkpoint.CheckpointMismatch):
        checkpoint.load(tmp_path, fingerprint_of(settings("--pairs-per-fold", "300")))


def fingerprint_of(settings) -> str:
    from training_jobs.federated.checkpoint import fingerprint
    return fingerprint(settings.identity())


def tiny_face_set(root: Path) -> Path:
    """Six people x 3 random 112x112 faces in LFW's layout; pairs.txt with fold 1 on people p0/p1 and fold 2 on
    p2/p3 (600 pairs each, repeated, as View-2's reader counts 600 per fold); p4/p5 in no fold."""
    import cv2

    rng = np.random.default_rng(0)
    for person in range(6):
        (root / f"p{person}").mkdir(parents=True)
        for index in range(1, 4):
            pixels = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
            cv2.imwrite(str(root / f"p{person}" / f"p{person}_{index:04d}.jpg"), pixels)
    lines = ["2\t300"]
    for a, b in (("p0", "p1"), ("p2", "p3")):
        lines += [f"{a}\t1\t2"] * 300 + [f"{a}\t1\t{b}\t3"] * 300
    (root / "pairs.txt").write_text("\n".join(lines) + "\n")
    return root


@needs_flwr
def test_simulate_draws_clients_and_heldout_pairs_from_the_face_set_it_is_given(tmp_path, capsys):
    """`--faces DIR --heldout-folds F`: the clients are the set's people outside F, the held-out pairs are F's,
    and the settings name both; a folder without pairs.txt is refused in one usage line."""
    from inference.transform import spec_v0
    from training_jobs.federated.simulate import make_parser, population_and_heldout, server_settings

    faces = tiny_face_set(tmp_path / "set")
    args = make_parser().parse_args(["--faces", str(faces), "--heldout-folds", "2", "--clients", "4",
                                     "--pairs-per-fold", "4"])
    population, heldout = population_and_heldout(args, faces, spec_v0())
    assert [c.identity for c in population.clients] == ["p0", "p1", "p4", "p5"]
    assert heldout.identities == {"p2", "p3"} and len(heldout.pairs.pairs) == 4
    settings = server_settings(args, SHARED, spec_v0(), None)
    assert (settings.faces, settings.heldout_folds) == (str(faces.resolve()), (2,))
    with pytest.raises(SystemExit):
        make_parser().parse_args(["--faces", str(tmp_path)])
    assert f"{tmp_path} is not a face set: no pairs.txt in it" in capsys.readouterr().err


@needs_flwr
def test_a_cached_baseline_is_reused_only_for_the_same_pairs_and_model(tmp_path):
    """The guardrail's baseline is kept in the state directory for a resumed run; measured on other pairs (e.g.
    another --heldout-folds) it is measured again, not reused."""
    import json

    from inference.metadata import ModelMetadata
    from training_jobs.federated.heldout import Heldout
    from training_jobs.federated.simulate import baseline_metrics

    version = Path(__file__).resolve().parents[1] / "inference" / "bundled" / "v1-accurate"
    spec = ModelMetadata.load(version, verify=False).spec
    faces = tiny_face_set(tmp_path / "set")
    fold2, fold1 = Heldout(faces, spec, 4, folds=(2,)), Heldout(faces, spec, 4, folds=(1,))
    first = baseline_metrics(version, fold2, tmp_path / "state")
    cache = tmp_path / "state" / "baseline.json"
    saved = json.loads(cache.read_text())
    saved["metrics"]["accuracy"] = -1.0  # a marker: only a reuse returns it
    cache.write_text(json.dumps(saved))
    assert baseline_metrics(version, fold2, tmp_path / "state")["accuracy"] == -1.0
    again = baseline_metrics(version, fold1, tmp_path / "state")
    assert again["accuracy"] != -1.0 and again["num_pairs"] == first["num_pairs"] == 4
    assert json.loads(cache.read_text())["measured_on"]["heldout"] == fold1.fingerprint() != fold2.fingerprint()


# --- SecAgg+: masks from a CSPRNG, secure sums equal plain sums, dropouts ------------------------

@needs_flwr
def test_secagg_masks_come_from_chacha20_keyed_by_the_whole_seed():
    """Flower's own expansion folds the seed to 32 bits (XOR) for numpy's Mersenne Twister: two different seeds
    with the same fold give the same mask. Ours is installed on both sides and keys ChaCha20 with all of it."""
    import importlib

    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen as flower_prg
    from training_jobs.federated.secagg import chacha_masks

    client_mod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
    workflow = importlib.import_module("flwr.server.workflow.secure_aggregation.secaggplus_workflow")
    assert client_mod.pseudo_rand_gen is chacha_masks and workflow.pseudo_rand_gen is chacha_masks
    a = bytes(range(32))
    b = bytes([a[0] ^ 1, *a[1:4], a[4] ^ 1, *a[5:]])  # differs in two words whose XOR cancels
    shapes = [(3, 4), (1000,), ()]
    assert all(np.array_equal(x, y) for x, y in zip(flower_prg(a, 2**32, shapes), flower_prg(b, 2**32, shapes)))
    ours_a, ours_b = chacha_masks(a, 2**32, shapes), chacha_masks(b, 2**32, shapes)
    assert [m.shape for m in ours_a] == shapes and all(m.dtype == np.int64 for m in ours_a)
    assert not np.array_equal(ours_a[1], ours_b[1])
    assert all(np.array_equal(x, y) for x, y in zip(ours_a, chacha_masks(a, 2**32, shapes)))  # both sides agree
    big = chacha_masks(os.urandom(32), 2**32, [(200_000,)])[0]
    assert big.min() >= 0 and big.max() < 2**32 and abs(big.mean() / 2**32 - 0.5) < 0.01
    with pytest.raises(ValueError, match="power of two"):
        chacha_masks(a, 3 * 2**20, shapes)


def _probe_vector(partition: int, size: int = 5000) -> np.ndarray:
    return (np.random.default_rng(partition).standard_normal(size) * 0.1).astype(np.float32)


@needs_flwr
def test_secagg_sum_equals_the_plain_weighted_sum_when_a_tenth_of_the_clients_drop():
    """A real Flower simulation of SecAgg+ (10 clients, 1 drops after key sharing): the server's unmasked mean
    equals the plain weighted mean of the 9 survivors within the quantisation error, and what each client
    uploaded looks nothing like its vector (the masks hide it)."""
    from flwr.app import Message
    from flwr.clientapp import ClientApp
    from flwr.common import Code, FitIns, FitRes, Status, bytes_to_ndarray, ndarrays_to_parameters
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
    from flwr.compat.common import recorddict_compat as compat
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation
    from training_jobs.federated.secagg import SecAggSettings, run_secagg, secagg_if_requested
    from training_jobs.federated.simulate import BACKEND

    num, dropped_partition = 10, 3
    weights = {p: 1 + p % 4 for p in range(num)}
    client_app = ClientApp(mods=[secagg_if_requested])

    @client_app.train()
    def train(message, context):
        partition = int(context.node_config["partition-id"])
        if partition == dropped_partition:
            raise RuntimeError("dropped mid-round")
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([_probe_vector(partition)]), weights[partition],
                     {"partition": partition})
        return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=message)

    settings = SecAggSettings(clipping_range=1.0, max_weight=4)
    seen: dict = {}

    class Recording:  # the grid as the server uses it, keeping the masked vectors the server received
        def __init__(self, grid):
            self.grid = grid

        def send_and_receive(self, messages, timeout=None):
            replies = list(self.grid.send_and_receive(messages, timeout=timeout))
            for reply in replies:
                if not reply.has_error() and Key.MASKED_PARAMETERS in reply.content[RECORD_KEY_CONFIGS]:
                    seen.setdefault("masked", []).append(reply.content[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS])
            return replies

        def __getattr__(self, name):
            return getattr(self.grid, name)

    server_app = ServerApp()

    @server_app.main()
    def main(grid, context):
        while len(list(grid.get_node_ids())) < num:  # the simulated nodes register shortly after the start
            time.sleep(0.2)
        zero = ndarrays_to_parameters([np.zeros(5000, np.float32)])
        fitins = {node: FitIns(zero, {}) for node in grid.get_node_ids()}
        seen["outcome"] = run_secagg(Recording(grid), context, 1, fitins, settings)

    run_simulation(server_app, client_app, num_supernodes=num, backend_config=BACKEND)
    outcome = seen["outcome"]
    assert outcome.mean is not None and outcome.failures == 1 and len(outcome.results) == 9
    survivors = sorted(int(res.metrics["partition"]) for _, res in outcome.results)
    assert survivors == [p for p in range(num) if p != dropped_partition]
    total = sum(weights[p] for p in survivors)
    plain = sum(weights[p] * _probe_vector(p) for p in survivors) / total
    step = 2 * settings.clipping_range / settings.quantization_range  # per unit of weight / max_weight
    bound = len(survivors) * step / (total / settings.max_weight)
    error = np.abs(outcome.mean[0] - plain).max()
    assert error <= bound, (error, bound)
    assert error > 0, "stochastic quantisation leaves a (tiny) error: an exact match means no SecAgg+"
    uploads = [bytes_to_ndarray(arrays[-1]).astype(np.float64).ravel() for arrays in seen["masked"]]
    for upload in uploads:  # uniform over [0, 2^32): no trace of the ±0.1 vectors
        assert 0.4 < upload.mean() / 2**32 < 0.6
        assert max(abs(np.corrcoef(upload[-5000:], _probe_vector(p))[0, 1]) for p in survivors) < 0.1


@needs_flwr
@needs_data
def test_secagg_round_of_the_face_model_equals_fedavg_of_the_survivors_updates():
    """SecAgg+ on the real model (5 clients, 1 told to drop after key sharing; 3 of 5 shares rebuild its mask): the
    run completes and the new global model is the weighted FedAvg of the survivors' local updates (recomputed
    here, in this process, with the same seeds) within the quantisation error. Five, not ten: every client trains
    the real model twice (in the run and here), and the protocol at ten clients is the probe-vector test's."""
    import json

    from inference.lfw import load_many
    from inference.transform import spec_v0
    from training_jobs.federated.client_app import local_update
    from training_jobs.federated.params import build_base_model, get_arrays, travelling_names
    from training_jobs.federated.secagg import SecAggSettings
    from training_jobs.federated.settings import ServerSettings
    from training_jobs.federated.simulate import simulate

    spec = spec_v0()
    population = make_population(LFW, 5, min_images=2, max_images=2)
    local = {"epochs": 1, "batch-size": 2}
    settings = ServerSettings(str(SHARED), spec.to_dict(), "adapter-tail", rounds=1, clients_per_round=5,
                              num_clients=5, seed=0, local=local, aggregation="secagg+", drop_fraction=0.2,
                              secagg={"max_weight": 2})
    log = simulate(population, settings, LFW, heldout=None)
    entry = log["rounds"][0]
    assert (entry["sampled"], entry["replied"], entry["failed"]) == (5, 4, 1) and not entry["secagg"]["halted"]
    assert entry["bytes_up_per_client"] > 8 * 333_888, "masked vectors are int64: 8 bytes per parameter"
    model = build_base_model(spec, SHARED)
    start = get_arrays(model, travelling_names(model, "adapter-tail"))
    config = {"transform": json.dumps(spec.to_dict()), **local, "seed": 0, "server-round": 1}
    updates = []
    for client in entry["replied_clients"]:
        partition = int(client.removeprefix("partition-"))
        faces = load_many(LFW, list(population.clients[partition].images))
        updates.append(local_update(start, config, None, faces, SHARED, partition).arrays)
    clip = SecAggSettings().clipping_range
    step = 2 * clip / SecAggSettings().quantization_range
    moved = 0.0
    for name, value in start.items():
        expected = np.mean([np.clip(u[name] - value, -clip, clip) for u in updates], axis=0)
        got = log["final_arrays"][name] - value
        # quantisation error of the secure sum, plus float32 rounding of global + mean at this magnitude
        tolerance = len(updates) * step + 2 * np.spacing(np.abs(value).astype(np.float32))
        assert np.all(np.abs(got - expected) <= tolerance), (name, float(np.abs(got - expected).max()))
        moved = max(moved, float(np.abs(expected).max()))
    assert moved > 1e-4, "the updates must be far larger than the tolerance for the comparison to mean anything"


def _simulate_cmd(state_dir: Path, rounds: int = 3) -> list[str]:
    return [sys.executable, "-m", "training_jobs.federated.simulate", "--clients", "3", "--per-round", "2",
            "--rounds", str(rounds), "--max-images", "2", "--pairs-per-fold", "2", "--progress",
            "--state-dir", str(state_dir)]


def _group_members(pgid: int) -> list[str]:
    """Live (not zombie) processes of a process group."""
    out = subprocess.run(["ps", "-eo", "pgid=,stat=,pid="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.split()[0] == str(pgid) and not line.split()[1].startswith("Z")]


def _last_event(stdout: str) -> dict:
    import json
    return [json.loads(line) for line in stdout.splitlines() if line.startswith('{"event"')][-1]


@needs_flwr
@needs_data
@pytest.mark.slow
def test_a_run_killed_mid_job_resumes_from_its_last_round_and_ends_as_an_uninterrupted_one(tmp_path):
    """Real processes: a reference run to the end; a second run SIGKILLed (its whole process group, Ray
    included) after round 1; started again on the same state directory it resumes after its last saved
    round and ends with the reference's parameters (sampling is seeded per round, class vectors are restored
    by client id)."""
    import json
    import signal

    from training_jobs.federated import checkpoint

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    reference = subprocess.run(_simulate_cmd(tmp_path / "reference"), cwd=ROOT, env=env, capture_output=True,
                               text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = checkpoint.load(tmp_path / "reference")
    assert expected.round == 3 and _last_event(reference.stdout)["status"] == "finished"

    proc = subprocess.Popen(_simulate_cmd(tmp_path / "run"), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        for line in proc.stdout:
            if line.startswith('{"event"') and json.loads(line).get("round") == 1:
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = checkpoint.load(tmp_path / "run").round
    assert 1 <= killed_at < 3, killed_at  # killed after round 1, before the last round was saved
    deadline = time.monotonic() + 20  # SIGKILLed processes take a moment to be reaped
    while (leftovers := _group_members(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not leftovers, f"processes of the killed run survived: {leftovers}"

    resumed = subprocess.run(_simulate_cmd(tmp_path / "run"), cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = _last_event(resumed.stdout)
    assert result["status"] == "finished" and result["resumed"] == [{"from_round": killed_at}]
    assert [r["round"] for r in result["rounds"]] == [1, 2, 3]
    rounds_seen = [json.loads(line)["round"] for line in resumed.stdout.splitlines() if line.startswith('{"event": "round"')]
    assert rounds_seen == [0, 1, 2, 3], rounds_seen  # saved rounds replayed, then the new ones
    final = checkpoint.load(tmp_path / "run")
    assert final.round == 3 and sorted(final.class_vectors) == sorted(expected.class_vectors)
    for name, value in expected.arrays.items():
        np.testing.assert_allclose(final.arrays[name], value, rtol=0, atol=1e-6, err_msg=name)
    from inference.transform import spec_v0
    from training_jobs.federated.params import build_base_model, get_arrays, travelling_names
    model = build_base_model(spec_v0(), SHARED)
    initial = get_arrays(model, travelling_names(model, "adapter-tail"))
    assert max(float(np.abs(final.arrays[k] - initial[k]).max()) for k in initial) > 1e-4, "training moved nothing"


@needs_flwr
@needs_data
def test_a_state_saved_by_other_settings_is_refused(tmp_path):
    from training_jobs.federated import checkpoint

    checkpoint.save(tmp_path, checkpoint.RoundState(1, {"w": np.zeros(2, np.float32)}, {}, {}, "other"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(_simulate_cmd(tmp_path), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "other settings" in proc.stderr
    assert checkpoint.load(tmp_path).fingerprint == "other", "a refused state is left as it was"


@needs_flwr
@needs_data
def test_a_run_starts_from_the_bundled_v1_model_rebuilt_from_its_onnx_file(tmp_path):
    """What a federated job on a v1 deployment runs (`--base-dir` = the active bundled v1, ONNX only): 2 clients,
    1 round. The model the rounds start from is v1 rebuilt from its ONNX file: its round-0 held-out metrics (PyTorch)
    equal the served ONNX's on the same pairs and noise draws (--baseline-dir), and the round's clients trained
    that model (the global parameters end close to v1's, not to v0's). Held-out: 2 pairs per fold of folds 6-10."""
    from inference.export import saved_weights
    from inference.metadata import ModelMetadata
    from training_jobs.federated.params import build_base_model, get_arrays, travelling_names

    v1 = ROOT / "inference" / "bundled" / "v1-accurate"
    cmd = [sys.executable, "-m", "training_jobs.federated.simulate", "--clients", "2", "--per-round", "2",
           "--rounds", "1", "--max-images", "2", "--pairs-per-fold", "2", "--progress", "--heldout-every-round",
           "--base-dir", str(v1), "--baseline-dir", str(v1), "--state-dir", str(tmp_path / "state")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = _last_event(proc.stdout)
    assert result["status"] == "finished" and result["base"] == "v1-accurate"
    assert [(r["replied"], r["failed"]) for r in result["rounds"]] == [(2, 0)]

    def timeless(metrics: dict) -> dict:
        return {name: value for name, value in metrics.items() if name not in ("seconds", "version")}

    assert timeless(result["heldout"]["0"]) == timeless(result["baseline"]), (result["heldout"], result["baseline"])
    from training_jobs.federated import checkpoint
    final = checkpoint.load(tmp_path / "state").arrays
    spec = ModelMetadata.load(v1).spec
    start = build_base_model(spec, SHARED, *saved_weights(v1))
    names = travelling_names(start, "adapter-tail")
    from_v1 = get_arrays(start, names)
    from_v0 = get_arrays(build_base_model(spec, SHARED), names)
    moved = max(float(np.abs(final[k] - from_v1[k]).max()) for k in names)
    apart = max(float(np.abs(from_v0[k] - from_v1[k]).max()) for k in names)
    assert 0 < moved < apart / 10, (moved, apart)
    assert result["heldout"]["1"]["num_pairs"] == 10

