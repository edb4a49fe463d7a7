"""Extra unlabelled faces for distillation (issue 10 item 4): the loader, the distill-only loss, the SDK alignment."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from client.align import align_face
from common.paths import PROJECT_ROOT
from inference.lfw import lfw_dir, load_rgb, read_pairs, shared_dir
from inference.transform import spec_v0
from training_jobs import ab_compare
from training_jobs.datasets import EXTRA_FACES_LICENSE, MixedFaces, kept_faces, make_split, training_faces
from training_jobs.extra_faces import align, heldout_gallery, impostor_threshold, verdict
from training_jobs.losses import UNLABELLED, MarginHead
from tests.conftest import one_torch_thread

LFW = lfw_dir(shared_dir())
needs_lfw = pytest.mark.skipif(not (LFW / "pairs.txt").exists(), reason=f"aligned LFW absent under {LFW}")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    yield from one_torch_thread()


def test_margin_loss_ignores_unlabelled_rows():
    torch.manual_seed(0)
    head = MarginHead(16, 5)
    embeddings = torch.randn(6, 16, requires_grad=True)
    labels = torch.tensor([0, UNLABELLED, 3, UNLABELLED, 4, 1])
    loss, cos = head(embeddings, labels)
    known = labels != UNLABELLED
    alone, _ = head(embeddings[known].detach(), labels[known])
    assert torch.allclose(loss, alone) and cos.shape == (6, 5)
    loss.backward()
    assert embeddings.grad is not None
    assert torch.all(embeddings.grad[~known] == 0) and torch.all(embeddings.grad[known].abs().sum(1) > 0)


def test_margin_loss_of_an_all_unlabelled_batch_is_zero_and_differentiable():
    head = MarginHead(8, 3)
    embeddings = torch.randn(4, 8, requires_grad=True)
    loss, _ = head(embeddings, torch.full((4,), UNLABELLED))
    loss.backward()
    assert loss.item() == 0.0 and embeddings.grad is not None and torch.all(embeddings.grad == 0)


def test_kept_faces_requires_the_prepared_listing(tmp_path):
    with pytest.raises(FileNotFoundError, match="extra_faces prepare"):
        kept_faces(tmp_path)
    (tmp_path / "kept.txt").write_text("faces/a.jpg\n\nfaces/b.jpg\n")
    assert kept_faces(tmp_path) == ["faces/a.jpg", "faces/b.jpg"]


@needs_lfw
def test_training_faces_appends_unlabelled_extra_faces(tmp_path):
    split = make_split(LFW, max_identities=3, max_images_per_identity=2)
    donors = split.train_images[:2]  # real aligned faces stand in for the prepared extra faces
    (tmp_path / "faces").mkdir()
    for index, path in enumerate(donors):
        shutil.copy(LFW / path, tmp_path / "faces" / f"{index}.jpg")
    (tmp_path / "kept.txt").write_text("faces/0.jpg\nfaces/1.jpg\n")
    plain = training_faces(LFW, split, spec_v0(), None, seed=0)
    mixed = training_faces(LFW, split, spec_v0(), None, seed=0, extra=str(tmp_path))
    assert isinstance(mixed, MixedFaces) and not isinstance(plain, MixedFaces)
    assert len(mixed) == len(split.train_images) + 2
    features, clean, label = mixed[len(split.train_images)]
    assert label == UNLABELLED and features.shape == spec_v0().shape
    assert np.array_equal(clean.numpy(), load_rgb(LFW, donors[0]))
    assert [mixed[i][2] for i in range(len(split.train_images))] == split.train_labels
    first = mixed[len(mixed) - 1][0]
    mixed.set_epoch(1)  # a fresh noise draw on the extra faces too
    assert not torch.equal(first, mixed[len(mixed) - 1][0])
    (tmp_path / "kept.txt").write_text("")
    with pytest.raises(ValueError, match="lists no faces"):
        training_faces(LFW, split, spec_v0(), None, seed=0, extra=str(tmp_path))


def test_alignment_is_the_sdks():
    rng = np.random.default_rng(3)
    photo = rng.integers(0, 256, (240, 200, 3), dtype=np.uint8)
    landmarks = np.array([[80, 100], [125, 98], [103, 125], [85, 150], [122, 149]], np.float32)
    assert np.array_equal(align(photo, landmarks), align_face(photo, landmarks))


def test_detection_verdicts():
    def row(score: float, eye_gap: float) -> list[float]:
        return [0, 0, 50, 50, 10, 10, 10 + eye_gap, 10, 0, 0, 0, 0, 0, 0, score]
    assert verdict(np.zeros((0, 15))) == "no_face"
    assert verdict(np.array([row(0.95, 40), row(0.6, 40)])) == "several_faces"
    assert verdict(np.array([row(0.95, 40)])) == "kept"
    assert verdict(np.array([row(0.7, 40)])) == "unclear"
    assert verdict(np.array([row(0.95, 10)])) == "unclear"


def test_impostor_threshold_counts_only_different_identities():
    vectors = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.6, 0.8]]), dim=1).numpy()
    labels = np.array([0, 0, 1, 2])  # the near-duplicate pair (0, 1) is genuine and must not set the threshold
    assert impostor_threshold(vectors, labels, far=1e-9) == pytest.approx(0.8, abs=0.01)


@needs_lfw
def test_heldout_gallery_is_every_image_of_folds_6_to_10():
    gallery = heldout_gallery(LFW)
    names = {p.split("/")[0] for pair in read_pairs(LFW) if pair.fold >= 6 for p in (pair.left, pair.right)}
    assert {p.split("/")[0] for p in gallery} == names
    assert not names & set(make_split(LFW).identities)


def tiny_sealed_config(tmp_path: Path, photos: int, **data: Any) -> dict[str, Any]:
    """A tiny sealed run (2 identities x 4 images, width 8, 2 epochs) and an extra-faces folder of ``photos``
    training-identity photos (outside folds 6-10) laid out as `extra_faces prepare` leaves it."""
    from training_jobs.train_config import DEFAULTS, merge
    (tmp_path / "extra" / "faces").mkdir(parents=True)
    for index, path in enumerate(make_split(LFW).train_images[-photos:]):
        shutil.copy(LFW / path, tmp_path / "extra" / "faces" / f"{index}.jpg")
    (tmp_path / "extra" / "kept.txt").write_text("".join(f"faces/{i}.jpg\n" for i in range(photos)))
    return merge(DEFAULTS, {
        "name": "tiny-extra", "device": "cpu", "threads": 1, "out_dir": str(tmp_path / "run"),
        "data": {"max_identities": 2, "max_images_per_identity": 4, "min_images": 4, **data},
        "model": {"kind": "sealed-cnn", "activation": "quad", "width": 8},
        "loss": {"head": {"init": "random"}}, "optim": {"epochs": 2, "batch_size": 8, "warmup_steps": 1},
        "eval": {"epoch_pairs_per_fold": 0}})


@needs_lfw
def test_a_tiny_sealed_run_distils_on_extra_faces(tmp_path):
    from training_jobs.train import Trainer
    config = tiny_sealed_config(tmp_path, 8, extra_faces=str(tmp_path / "extra"))
    config["augment"] = None
    trainer = Trainer(config)
    assert len(trainer.dataset) == 16 and trainer.steps_per_epoch == 2
    trainer.fit()
    for metrics in trainer.history:
        assert metrics["samples"] == 16 and metrics["distill"] > 0 and 0 <= metrics["train_acc"] <= 1
    out = tmp_path / "ab.json"  # the same checkpoint twice: the paired comparison must find no difference
    ab_compare.main(["--run", f"A={tmp_path / 'run'}", "--run", f"B={tmp_path / 'run'}", "--folds", "6-7",
                     "--pairs-per-fold", "4", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["pairs"] == 8 and report["paired"]["b_minus_a"] == 0 and report["paired"]["only_a_right"] == 0
    ab_compare.main(["--run", f"A={tmp_path / 'run'}", "--run", f"B={tmp_path / 'run'}", "--flip", "B", "--folds",
                     "6-7", "--pairs-per-fold", "4", "--out", str(out)])  # B embeds e(x) + e(flip x)
    flipped = json.loads(out.read_text())["models"]
    assert not flipped["A"]["test_time_flip"] and flipped["B"]["test_time_flip"]
    assert flipped["A"]["verification"] == report["models"]["A"]["verification"]
    assert flipped["B"]["verification"] != flipped["A"]["verification"]  # the flip changed B's scores
    with pytest.raises(SystemExit, match="--flip names no --run"):
        ab_compare.main(["--run", f"A={tmp_path / 'run'}", "--run", f"B={tmp_path / 'run'}", "--flip", "C"])
    # --bundle: the same pairs decided at a served bundle's own thresholds (1:1, and the 1:N schedule's at a gallery)
    from inference.operating_points import ImpostorCurve
    curve = ImpostorCurve.from_scores(np.linspace(-0.5, 0.9, 500)).to_dict()
    for name, threshold in (("lenient", -1.0), ("strict", 1.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "sealed.json").write_text(json.dumps({"threshold": threshold, "impostor_curve": curve}))
    ab_compare.main(["--run", f"A={tmp_path / 'run'}", "--run", f"B={tmp_path / 'run'}", "--folds", "6-7",
                     "--pairs-per-fold", "4", "--bundle", f"A={tmp_path / 'lenient'}", "--bundle",
                     f"B={tmp_path / 'strict'}", "--gallery", "100", "--out", str(out)])
    served = json.loads(out.read_text())["served"]
    lenient, strict = served["models"]["A"], served["models"]["B"]
    assert lenient["genuine_accepted"] == lenient["impostors_accepted"] == 1.0  # everything matches at -1
    assert strict["genuine_accepted"] == strict["impostors_accepted"] == 0.0
    assert lenient["identify_threshold"] == pytest.approx(ImpostorCurve.from_dict(curve).threshold(1 - 0.99 ** 0.01))
    assert lenient["gallery"] == 100  # a step of the gateway's schedule: its threshold is the curve's at that size
    assert strict["identify_threshold"] == 1.0  # never below the verify threshold
    assert served["paired_at_verify_threshold"]["pairs"] == 8 and served["paired_genuine_above_identify_threshold"]["pairs"] == 4
    (tmp_path / "flipped").mkdir()  # a bundle served with the test-time flip scores e(x) + e(flip x)
    (tmp_path / "flipped" / "sealed.json").write_text(json.dumps({"threshold": 0.3, "impostor_curve": curve,
                                                                   "flip_signs": [1, -1]}))
    with pytest.raises(SystemExit, match=r"scores with the test-time flip \(--flip B\)"):
        ab_compare.main(["--run", f"A={tmp_path / 'run'}", "--run", f"B={tmp_path / 'run'}", "--folds", "6-7",
                         "--pairs-per-fold", "4", "--bundle", f"A={tmp_path / 'lenient'}", "--bundle",
                         f"B={tmp_path / 'flipped'}"])
    with pytest.raises(SystemExit, match="a --bundle NAME=DIR for each --run"):
        ab_compare.main(["--run", f"A={tmp_path / 'run'}", "--run", f"B={tmp_path / 'run'}", "--folds", "6-7",
                         "--pairs-per-fold", "4", "--bundle", f"A={tmp_path / 'lenient'}"])


@needs_lfw
def test_cached_views_take_the_extra_faces_unlabelled_in_a_cache_file_of_their_own(tmp_path):
    from training_jobs.train import Trainer
    config = tiny_sealed_config(tmp_path, 6, cached_views=2)
    config["optim"]["batch_size"] = 7
    labelled_only = Trainer(config)
    (cache,) = (tmp_path / "run").glob("views-*.npz")
    config["data"]["extra_faces"] = str(tmp_path / "extra")
    trainer = Trainer(config)
    files = sorted((tmp_path / "run").glob("views-*.npz"))
    assert len(files) == 2 and cache in files  # the labelled images' cache is reused, the extra faces get their own
    dataset = trainer.dataset
    assert len(dataset) == 14 and dataset.labels == labelled_only.dataset.labels + [UNLABELLED] * 6
    (features, embeddings), (extra_features, extra_embeddings) = ((a["features"], a["embeddings"]) for a in dataset.sources)
    assert np.array_equal(features, labelled_only.dataset.sources[0]["features"]) and dataset.starts == [0, 8]
    assert extra_embeddings.shape == (6, 2, 128) and not np.array_equal(extra_embeddings[0], embeddings[0])

    def no_teacher(clean):
        raise AssertionError("the stored embeddings replace the teacher")

    trainer.teacher = no_teacher
    trainer.fit()
    for metrics in trainer.history:
        assert metrics["samples"] == 14 and metrics["distill"] > 0 and 0 <= metrics["train_acc"] <= 1


@needs_lfw
def test_extra_faces_may_have_fewer_views_than_the_labelled_images(tmp_path):
    """`data.extra_views`: each source keeps its own number of views; every sample is one of its own image's."""
    from training_jobs.train import Trainer
    config = tiny_sealed_config(tmp_path, 6, cached_views=3)
    config["data"].update(extra_faces=str(tmp_path / "extra"), extra_views=1)
    dataset = Trainer(config).dataset
    (features, embeddings), (extra_features, extra_embeddings) = ((a["features"], a["embeddings"]) for a in dataset.sources)
    assert features.shape[1] == 3 and extra_features.shape[:2] == (6, 1) and len(dataset) == 14
    for epoch in range(3):
        dataset.set_epoch(epoch)
        for index in (0, 7, 8, 13):
            _, target, label = dataset[index]
            stored = embeddings[index] if index < 8 else extra_embeddings[index - 8]
            assert any(torch.equal(target, torch.from_numpy(view)) for view in stored)
            assert (label == UNLABELLED) == (index >= 8)


def test_paired_comparison_counts_discordant_pairs():
    a = np.array([True, True, False, False, True])
    b = np.array([True, False, True, True, True])
    result = ab_compare.paired(a, b)
    assert result["b_minus_a"] == pytest.approx(0.2) and result["only_a_right"] == 1 and result["only_b_right"] == 2
    assert result["ci95"][0] <= 0.2 <= result["ci95"][1]


@pytest.mark.skipif(not (PROJECT_ROOT / "inference" / "bundled" / "v1-accurate").is_dir(), reason="no bundled model")
def test_the_model_card_states_the_celeba_licence_only_when_extra_faces_trained_it():
    from inference.metadata import ModelMetadata
    from training_jobs.model_card import render
    from training_jobs.train_config import load_config
    meta = ModelMetadata.load(PROJECT_ROOT / "inference" / "bundled" / "v1-accurate")
    config = load_config(PROJECT_ROOT / "training_jobs" / "configs" / "gpu-v0.yaml")
    assert "non-commercial research" not in render(meta, config, [])
    config["data"]["extra_faces"] = True
    assert EXTRA_FACES_LICENSE in render(meta, config, [])


def test_extra_batches_hold_every_labelled_image_once_per_epoch_and_extras_on_top():
    """data.extra_per_batch: each batch has batch_size labelled indices (the last one fewer), one pass over the
    labelled images per epoch as a plain run's, plus `extra` indices after them cycling through every extra face."""
    from training_jobs.extra_batches import LabelledPlusExtraBatches

    batches = list(LabelledPlusExtraBatches(labelled=21, extras=5, batch_size=8, extra=3, seed=42))
    labelled = [b[:-3] for b in batches]
    assert [len(b) for b in labelled] == [8, 8, 5] and sorted(i for b in labelled for i in b) == list(range(21))
    assert [i for b in labelled for i in b] != list(range(21))  # shuffled
    extras = [i for b in batches for i in b[-3:]]
    assert all(21 <= i < 26 for i in extras)
    assert sorted(extras[:5]) == list(range(21, 26)) and extras[5:] == extras[:4]  # a full pass, then wraps
    assert list(LabelledPlusExtraBatches(21, 5, 8, 3, seed=42)) == batches  # the epoch's seed fixes it
    assert list(LabelledPlusExtraBatches(21, 5, 8, 3, seed=43)) != batches
    with pytest.raises(ValueError, match=">= 1"):
        LabelledPlusExtraBatches(21, 0, 8, 3, seed=0)


@needs_lfw
def test_a_tiny_run_with_extra_per_batch_sees_every_labelled_image_and_extras_beside(tmp_path):
    from training_jobs.train import Trainer
    config = tiny_sealed_config(tmp_path, 6, extra_faces=str(tmp_path / "extra"), extra_per_batch=2)
    config["augment"] = None
    trainer = Trainer(config)
    assert len(trainer.dataset) == 14 and trainer.steps_per_epoch == 1  # 8 labelled in batches of 8
    labels = [int(label) for _, _, batch in trainer.loader(0) for label in batch]
    assert labels.count(UNLABELLED) == 2 and len(labels) == 10
    trainer.fit()
    assert all(metrics["samples"] == 10 and metrics["distill"] > 0 for metrics in trainer.history)
