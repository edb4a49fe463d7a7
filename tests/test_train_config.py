"""Setting up a training run: every committed config loads and builds the model it names; a key the trainer would
not read is refused before anything runs (a misspelt `depth` used to train the default shape silently); a model
whose embeddings are not finite is named as such, and only the untrained reference evaluation may skip over it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.sealed_student import SealedCnn, SealedFaceModel, depth_of, head_of
from inference.transform import PRESETS, SCREENED
from training_jobs.evaluate import ModelResult, NonFiniteEmbeddings, baseline, embed_all
from training_jobs.students import build_student
from training_jobs.train_config import load_config, make_spec, unknown_keys

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "training_jobs" / "configs").glob("*.yaml"))


def test_there_are_committed_configs():
    assert len(CONFIGS) >= 10


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_committed_config_loads_and_names_a_known_transform(path: Path):
    config = load_config(path)
    assert config["transform"]["preset"] in {**PRESETS, **SCREENED}  # a screened candidate is trained before it serves
    assert make_spec(config).num_channels > 0
    assert set(config["data"]["eval_folds"]) == {6, 7, 8, 9, 10}  # the held-out folds are never trained on


@pytest.mark.parametrize("path", [p for p in CONFIGS if load_config(p)["model"].get("kind") == "sealed-cnn"],
                         ids=lambda p: p.stem)
def test_every_sealed_config_builds_the_shape_it_declares(path: Path, tmp_path: Path):
    config = load_config(path)
    student = build_student(config["model"], make_spec(config), tmp_path)
    assert depth_of(student.state_dict()) == config["model"].get("depth", 2)
    assert head_of(student.state_dict()) == config["model"].get("head", "dense")


def test_a_random_subset_config_trains_the_spec_the_sdk_serves():
    spec = make_spec(load_config(ROOT / "training_jobs/configs/cpu-low8-rand33.yaml"))
    assert spec == SCREENED["dct8-low8-r33"](64.0) and spec.name == "dct8-low8-r33"
    assert spec.random_channels == 33 and spec.transform_id == "dct8-y56c5-lap64-r33"
    assert spec.epsilon_per_image == 33 * 196 * 64


def test_a_misspelt_key_is_named_and_nested_sections_are_checked():
    assert unknown_keys({"model": {"kind": "sealed-cnn", "dpeth": 3}, "optim": {"lr": 1e-3, "epoch": 2},
                         "export": {"version": "v9"}, "keep_every_epoch": True}) == ["model.dpeth", "optim.epoch"]


@pytest.mark.parametrize("text, expected", [("model: {dpeth: 3}\n", "unknown key(s) model.dpeth"),
                                            ("- a list\n", "a mapping of keys, not list"),
                                            ("model: {kind: [\n", "not YAML"),
                                            ("loss: {mixed_faces: 1.5}\n", "in [0, 1], not 1.5"),
                                            ("loss: {mixed_faces: 0.5}\ndata: {cached_views: 8}\n",
                                             "needs the teacher run online"),
                                            ("loss: {relation_weight: -1}\n", "a weight >= 0, not -1"),
                                            ("model: {init_onnx: inference/bundled/v1-accurate/model.onnx}\n",
                                             "needs a frequency-mobilefacenet with freeze_backbone_bn: true"),
                                            ("model: {init_onnx: x.onnx, freeze_backbone_bn: true}\n",
                                             "a model version folder"),
                                            ("loss: {relation_weight: 2}\nteacher: none\n", "needs a teacher"),
                                            ("loss: {hint_weight: -2}\n", "a weight >= 0, not -2"),
                                            ("transform: {preset: dct8-low99}\n",
                                             "transform.preset 'dct8-low99' is not a transform"),
                                            ("loss: {hint_weight: 4}\nmodel: {kind: sealed-cnn}\n",
                                             "needs model.kind sealed-cnn, data.cached_views"),
                                            ("loss: {hint_weight: 4}\ndata: {cached_views: 2}\n",
                                             "needs model.kind sealed-cnn, data.cached_views"),
                                            ("data: {extra_per_batch: -1}\n", "a number of faces >= 0, not -1"),
                                            ("data: {extra_per_batch: 8}\n", "needs data.extra_faces"),
                                            ("data: {extra_faces: true, cached_views: 2, extra_per_batch: 8}\n",
                                             "and no data.cached_views"),
                                            ("model: {context_width: -4}\n", "channels >= 0 for a frequency"),
                                            ("model: {context_width: 64, kind: sealed-cnn}\n",
                                             "channels >= 0 for a frequency-mobilefacenet, not 64"),
                                            ("optim: {context_lr: 0.001}\n", "not 0.001 (with context_width 0)"),
                                            ("model: {context_width: 8}\noptim: {context_lr: -1}\n",
                                             "a learning rate > 0 for model.context_width's layers, not -1")])
def test_the_trainer_refuses_a_bad_config_in_one_line_before_it_loads_data(tmp_path: Path, text: str,
                                                                           expected: str, capsys):
    """In-process (one import of torch for all cases); the real process's exit is checked once below."""
    from training_jobs.train import main
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(bad), "--out-dir", str(tmp_path / "run")])
    message = str(exit_.value.code)
    assert message.startswith("error: ") and "\n" not in message and expected in message, message
    assert capsys.readouterr().out == "" and not (tmp_path / "run").exists()


def test_the_trainer_cli_exits_1_with_one_line_on_stderr(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {dpeth: 3}\n")
    proc = subprocess.run([sys.executable, "-m", "training_jobs.train", "--config", str(bad),
                           "--out-dir", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == f"error: {bad}: unknown key(s) model.dpeth (training_jobs/train_config.py lists them)\n"
    assert not (tmp_path / "run").exists()


def test_an_untrained_deep_quadratic_student_overflows_so_its_baseline_is_skipped_with_the_reason():
    """What stopped the first depth-3 run at its epoch-0 reference evaluation (IndexError deep in tar_at_far)."""
    torch.manual_seed(0)
    student = SealedFaceModel(SealedCnn(5, "quad", 16, depth=3)).eval()
    planes = 100 * torch.randn(4, 5, 14, 14)  # the DC plane's scale before any BatchNorm statistics are learnt
    with torch.no_grad():
        out = student.backbone(planes).numpy()
    with pytest.raises(NonFiniteEmbeddings, match="4 of 4 embeddings are not finite"):
        embed_all(np.zeros((4, 1)), lambda faces: out[:len(faces)])

    def evaluate() -> ModelResult:
        embed_all(np.zeros((4, 1)), lambda faces: out[:len(faces)])
        raise AssertionError("embed_all should have refused these embeddings")

    assert baseline(evaluate) == {"skipped": "4 of 4 embeddings are not finite or zero: a diverged model, or "
                                             "BatchNorm statistics never calibrated (an untrained deep quadratic "
                                             "student)"}


def test_finite_embeddings_are_normalised_and_a_zero_one_is_refused():
    unit = embed_all(np.zeros((2, 1)), lambda faces: np.array([[3.0, 4.0], [0.0, 2.0]])[:len(faces)])
    assert np.allclose(unit, [[0.6, 0.8], [0.0, 1.0]])
    with pytest.raises(NonFiniteEmbeddings, match="1 of 2"):
        embed_all(np.zeros((2, 1)), lambda faces: np.array([[3.0, 4.0], [0.0, 0.0]])[:len(faces)])


def test_the_distillation_gap_is_measured_on_both_sets(tmp_path):
    """training_jobs.distill_gap on a tiny sealed checkpoint: a distance per set, in [0, 2]."""
    import json

    from training_jobs import distill_gap
    from training_jobs.train import Trainer
    from tests.test_extra_faces import tiny_sealed_config

    config = tiny_sealed_config(tmp_path, 2)
    config["optim"]["epochs"] = 1
    trainer = Trainer(config)
    trainer.fit()
    result = distill_gap.measure(trainer.checkpoint_path, 4)
    assert result["images"] == 4 and json.dumps(result)
    for key in ("one_minus_cos_train", "one_minus_cos_heldout_folds_6_10"):
        assert 0.0 <= float(result[key]) <= 2.0
    with pytest.raises(SystemExit, match="^error: "):
        distill_gap.main(["--checkpoint", str(tmp_path / "missing.pt")])


def test_the_distillation_gap_of_a_served_onnx_model_is_small_where_it_starts_from_the_teacher():
    """--model-dir: the bundled v1-accurate (MobileFaceNet behind an inverse-DCT adapter, fine-tuned from the
    teacher) stays near the pixel teacher on the noisy features of faces it never saw (0.13-0.14 on 300 images)."""
    from common.paths import PROJECT_ROOT
    from training_jobs import distill_gap

    result = distill_gap.measure(PROJECT_ROOT / "inference" / "bundled" / "v1-accurate", 8, onnx=True)
    assert result["model_dir"].endswith("v1-accurate")
    assert float(result["one_minus_cos_train"]) < 0.3 and float(result["one_minus_cos_heldout_folds_6_10"]) < 0.3
