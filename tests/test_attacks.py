"""training_jobs.attacks: the attacker never sees a folds 6-10 identity, the metrics are sane, a tiny A1 run
learns and resumes, and the CLI runs end to end on real LFW images (tiny sizes: a few steps, a few people)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.lfw import lfw_dir, read_pairs, shared_dir
from inference.mobilefacenet import WEIGHTS_SUBPATH
from inference.transform import clean as clean_features
from inference.transform import spec_low10, spec_v0
from training_jobs.attacks.a1_inverter import A1, ssim_torch
from training_jobs.attacks.data import attacker_split, check_disjoint, merged_releases, probe_set, training_faces
from training_jobs.attacks.evaluation import budget_label, identification, write_table
from training_jobs.attacks.training import Budget, train
from training_jobs.leakage import psnr, ssim
from tests.conftest import one_torch_thread

ROOT = Path(__file__).resolve().parents[1]
SHARED = shared_dir()
LFW = lfw_dir(SHARED)
needs_lfw = pytest.mark.skipif(not (LFW / "pairs.txt").exists(), reason=f"aligned LFW absent under {SHARED}")
needs_model = pytest.mark.skipif(not (SHARED / WEIGHTS_SUBPATH).exists(), reason="MobileFaceNet weights absent")
FOLDS_6_10 = (6, 7, 8, 9, 10)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    yield from one_torch_thread()


def held_out_identities() -> set[str]:
    return {path.split("/")[0] for p in read_pairs(LFW) if p.fold in FOLDS_6_10 for path in (p.left, p.right)}


# --- the split ------------------------------------------------------------------------------------

@needs_lfw
def test_attacker_never_trains_on_a_folds_6_to_10_identity():
    held = held_out_identities()
    split = attacker_split(LFW)
    assert len(split.train_images) == 6922
    assert not {p.split("/")[0] for p in split.train_images} & held
    faces = training_faces(LFW, spec_v0(), max_identities=3, max_images_per_identity=2)
    assert not {p.split("/")[0] for p in faces.images} & held


@needs_lfw
def test_the_disjointness_check_refuses_a_leaked_identity():
    held = held_out_identities()
    leaked = sorted(held)[0]
    with pytest.raises(AssertionError, match="held-out identities"):
        check_disjoint(["Some_Public_Person/Some_Public_Person_0001.jpg", f"{leaked}/{leaked}_0001.jpg"], held)


@needs_lfw
def test_probes_and_gallery_come_from_folds_6_to_10_only():
    probes = probe_set(LFW, max_probes=1000)
    held = held_out_identities()
    assert set(probes.gallery_ids) <= held and set(probes.probe_ids) <= held
    assert set(probes.probe_ids) <= set(probes.gallery_ids)
    assert len(probes.gallery_paths) == len(set(probes.gallery_ids)) == 813 and len(probes.probe_paths) == 1000
    assert not set(probes.gallery_paths) & set(probes.probe_paths)


# --- metrics --------------------------------------------------------------------------------------

def test_psnr_and_ssim_of_identical_images():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(112, 112, 3), dtype=np.uint8)
    assert psnr(image, image) == float("inf")
    assert ssim(image[..., 0], image[..., 0]) == pytest.approx(1.0)
    worse = np.clip(image.astype(int) + rng.integers(-40, 41, size=image.shape), 0, 255)
    assert 10 < psnr(image, worse) < 30 and ssim(image[..., 0], worse[..., 0]) < 0.99
    other = rng.integers(0, 256, size=image.shape, dtype=np.uint8)
    assert abs(ssim(image[..., 0], other[..., 0])) < 0.1
    t = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    assert float(ssim_torch(t, t)) == pytest.approx(1.0, abs=1e-5)
    assert float(ssim_torch(t, torch.full_like(t, 0.5))) < 0.1


def test_identification_metrics_on_synthetic_embeddings():
    gallery = np.eye(4)
    ids = ["a", "b", "c", "d"]
    result = identification(gallery, ids, gallery, ids)
    assert result["rank1"] == 1.0 and result["tar_at_far_1e-3"] == 1.0
    assert (result["genuine_scores"], result["impostor_scores"]) == (4, 12)
    shuffled = identification(gallery, ids, gallery[[1, 0, 3, 2]], ids)
    assert shuffled["rank1"] == 0.0


@needs_lfw
def test_sface_rank1_of_clean_photos_of_a_few_people_is_one():
    from training_jobs.evaluate import embed_all
    from training_jobs.sface import SFaceEmbedder
    probes = probe_set(LFW, max_probes=None, max_identities=5)
    embed = SFaceEmbedder(threads=1).embed
    gallery = embed_all(probes.gallery_faces, embed)
    assert identification(gallery, probes.gallery_ids, gallery, probes.gallery_ids)["rank1"] == 1.0
    clean = identification(gallery, probes.gallery_ids, embed_all(probes.probe_faces, embed), probes.probe_ids)
    assert clean["rank1"] == 1.0, clean


# --- training -------------------------------------------------------------------------------------

@needs_lfw
def test_tiny_a1_run_learns_and_resumes(tmp_path):
    spec = spec_low10()
    faces = training_faces(LFW, spec, max_identities=2, max_images_per_identity=8)
    torch.manual_seed(0)
    attack = A1(spec.num_channels)
    checkpoint = tmp_path / "checkpoint.pt"
    first = train(attack, faces, Budget(minutes=5, batch=8, lr=2e-3, max_steps=20), checkpoint, {}, log=lambda m: None)
    assert first.step == 20 and checkpoint.exists()
    resumed = A1(spec.num_channels)
    more = train(resumed, faces, Budget(minutes=5, batch=8, lr=2e-3, max_steps=40), checkpoint, {}, log=lambda m: None)
    assert more.step == 40 and more.losses[:2] == first.losses[:2]  # continued, not restarted
    assert more.losses[-1] < 0.7 * more.losses[0], more.losses


@needs_lfw
@pytest.mark.parametrize("clock", ["wall", "cpu"])
def test_time_budget_stops_training(tmp_path, clock):
    spec = spec_v0()
    faces = training_faces(LFW, spec, max_identities=2, max_images_per_identity=4)
    progress = train(A1(spec.num_channels), faces, Budget(minutes=0.05, batch=4, clock=clock), tmp_path / "c.pt",
                     {}, log=lambda m: None)
    assert 3.0 <= progress.elapsed < 10.0 and progress.step >= 1
    assert progress.wall >= progress.elapsed - 0.5  # one thread: CPU time never runs ahead of wall time much


# --- CLI and docs ----------------------------------------------------------------------------------

def test_table_is_rewritten_between_markers(tmp_path):
    row = {"run": "a1-x", "attack": "a1", "scorer": "sface", "transform": "dct8-v0", "epsilon": "64", "minutes": 8.0,
           "steps": 10, "epochs": 0.5, "rank1": 0.5, "chance_rank1": 0.001, "sface_rank1_clean_probes": 0.98,
           "tar_at_far_1e-3": 0.2, "psnr_mean_db": 20.0, "ssim_mean": 0.7, "probes": 1000, "gallery": 813}
    readme = tmp_path / "README.md"
    readme.write_text("# Attacks\n\nintro\n")
    write_table(readme, [row])
    write_table(readme, [row, {**row, "run": "a1-y", "rank1": 0.25}])
    text = readme.read_text()
    assert text.startswith("# Attacks\n\nintro\n") and text.count("attacks-table:start") == 1
    assert "**50.0%**" in text and "**25.0%**" in text


def test_a_run_stopped_by_its_step_cap_shows_the_steps_as_its_budget():
    """A CPU-minute buys ~2x fewer steps on a slower machine: a run matched in steps to another machine's says so."""
    row = {"minutes": 60.0, "clock": "cpu", "steps": 4950, "max_steps": 4950, "train_seconds": 2725.5}
    assert budget_label(row) == "4950 steps (45 min cpu)"
    assert budget_label({**row, "steps": 3000}) == "60 min cpu"  # the minutes ran out first
    assert budget_label({"minutes": 8.0, "steps": 10}) == "8 min wall"  # rows recorded before the cap was kept


@needs_lfw
@needs_model
@pytest.mark.parametrize("attack", ["a1", "a2", "a3"])
def test_cli_trains_scores_and_records(tmp_path, attack):
    out, runs = tmp_path / "docs", tmp_path / "runs"
    command = [sys.executable, "-m", "training_jobs.attacks", "run", "--attack", attack, "--transform", "dct8-low10",
               "--minutes", "1", "--max-steps", "2", "--batch", "4", "--max-train-identities", "2",
               "--max-images-per-identity", "4", "--max-eval-identities", "4", "--max-probes", "6",
               "--out", str(out), "--runs-dir", str(runs)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())
    assert [r["run"] for r in rows] == [f"{attack}-dct8-low10-eps64-1min"]
    row = rows[0]
    assert row["steps"] == 2 and row["gallery"] == 4 and row["chance_rank1"] == 0.25 and 0 <= row["rank1"] <= 1
    assert (runs / row["run"] / "checkpoint.pt").exists()
    assert ("psnr_mean_db" in row) == (attack != "a3")
    assert not (out / "README.md").exists()  # a reduced protocol never reaches the docs table


# --- PartialFace-style random channel subsets (a screened candidate) ------------------------------

@needs_lfw
def test_the_random_subset_attacker_trains_and_is_scored_on_subsets(tmp_path):
    spec = dataclasses.replace(spec_low10(), random_channels=7)
    dataset = training_faces(LFW, spec, seed=0, max_identities=2, max_images_per_identity=3)
    features, _, _ = dataset[0]
    assert int((features.abs().sum(dim=(1, 2)) > 0).sum()) == 7
    dataset.set_epoch(1)
    assert not torch.equal(dataset[0][0] != 0, features != 0)  # a new subset each epoch
    probes = probe_set(LFW, max_probes=4, max_identities=3).probe_features(spec, 0)
    assert ((np.abs(probes).sum(axis=(2, 3)) > 0).sum(axis=1) == 7).all()


# --- the same photo released several times (fresh noise and subset each), merged by the attacker ------------------

def test_merged_releases_carry_more_channels_and_less_noise_than_one():
    spec = dataclasses.replace(spec_low10(), random_channels=7)
    face = np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    clean = clean_features(face, spec).astype(np.float32)
    rng = np.random.default_rng(1)
    one, four = merged_releases(face, spec, rng, 1), merged_releases(face, spec, rng, 4)
    carried = [int((np.abs(f).sum(axis=(1, 2)) > 0).sum()) for f in (one, four)]
    assert carried[0] == 7 and 7 < carried[1] <= min(28, spec.num_channels) and four.dtype == np.float32
    many = merged_releases(face, spec.with_epsilon(8.0), rng, 64)
    assert int((np.abs(many).sum(axis=(1, 2)) > 0).sum()) == spec.num_channels  # 64 subsets of 7 cover all 28
    single = merged_releases(face, spec.with_epsilon(8.0), rng, 1)
    kept = np.abs(single).sum(axis=(1, 2)) > 0
    # each channel averaged over ~16 releases: its noise shrinks ~4x (never to zero)
    assert np.abs(many[kept] - clean[kept]).mean() < 0.5 * np.abs(single[kept] - clean[kept]).mean()
    pinned = merged_releases(np.stack([face, face[::-1]]), spec, rng, 8, pinned=True)
    masks = np.abs(pinned).sum(axis=(2, 3)) > 0
    assert (masks.sum(axis=1) == 7).all() and not (masks[0] == masks[1]).all()  # 7 per photo, its own 7


@needs_lfw
def test_the_merged_release_attacker_trains_and_is_scored_on_merges(tmp_path):
    spec = dataclasses.replace(spec_low10(), random_channels=7)
    dataset = training_faces(LFW, spec, seed=0, max_identities=2, max_images_per_identity=3, releases=3)
    assert int((dataset[0][0].abs().sum(dim=(1, 2)) > 0).sum()) > 7
    probes = probe_set(LFW, max_probes=4, max_identities=3).probe_features(spec, 0, releases=3)
    assert ((np.abs(probes).sum(axis=(2, 3)) > 0).sum(axis=1) > 7).all()


def test_the_cli_refuses_zero_releases_in_one_line(tmp_path):
    command = [sys.executable, "-m", "training_jobs.attacks", "run", "--attack", "a1", "--transform", "dct8-low10",
               "--minutes", "1", "--releases", "0", "--runs-dir", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "--releases: must be >= 1, not 0" in done.stderr.splitlines()[-1]
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("options, expected", [
    (["--transform", "dct8-low8-r33", "--random-channels", "20"], "dct8-low8-r33 already releases 33 channels"),
    (["--transform", "dct8-low8", "--random-channels", "66"], "--random-channels must be in 1..65 for dct8-low8"),
    (["--transform", "dct8-low8", "--random-channels", "33", "--pinned-subset"], "--pinned-subset needs --releases > 1"),
    (["--transform", "dct8-low8", "--releases", "2", "--pinned-subset"], "and a random-subset transform")])
def test_the_cli_refuses_subset_options_that_would_attack_another_transform(tmp_path, options, expected):
    command = [sys.executable, "-m", "training_jobs.attacks", "run", "--attack", "a1", "--minutes", "1",
               "--runs-dir", str(tmp_path), *options]
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and expected in done.stderr.splitlines()[-1], done.stderr[-500:]
    assert not any(tmp_path.iterdir())
