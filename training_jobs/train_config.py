"""What a training run is: its configuration (defaults merged with an experiment's YAML/JSON), the transform it
trains for, its seeds and its device. `training_jobs/train.py` runs it; the model card reads the same configs.
"""
from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inference.transform import PRESETS, SCREENED, TransformSpec

DEFAULTS: dict[str, Any] = {
    "name": "experiment",
    "seed": 0,
    "device": "auto",
    "threads": None,  # torch CPU threads (None: leave torch's default)
    "out_dir": None,  # default var/training/<name>
    "shared_dir": None,  # default $PRIVFACE_SHARED_DIR or ../shared
    "transform": {"preset": "dct8-v0", "epsilon": 64.0},
    "data": {"eval_folds": [6, 7, 8, 9, 10], "min_images": 1, "max_identities": None,
             "max_images_per_identity": None, "num_workers": 0,
             "extra_faces": False,  # true (PRIVFACE_EXTRA_FACES_DIR) or a folder: unlabelled faces, distillation only
             "cached_views": 0,  # N > 0: N augmented views per image with the teacher's embeddings, computed once
             "extra_views": None,  # views per extra face (None: cached_views)
             "extra_per_batch": 0},  # N > 0: batch_size labelled + N extra faces per batch (extra_batches.py)
    "augment": {"flip": 0.5, "brightness": 0.1, "contrast": 0.1, "translate": 4},
    "model": {"adapter_learnable": True, "freeze_backbone_bn": False,
              "init_onnx": None},  # a served ONNX model of the same family to start from (students.load_served_onnx)
    "teacher": "mobilefacenet",  # mobilefacenet | sface | none
    "loss": {"identity_weight": 1.0, "distill_weight": 1.0,
             "head": {"kind": "cosface", "scale": 32.0, "margin": 0.35, "init": "teacher_means"}},
    "optim": {"epochs": 40, "batch_size": 128, "lr": 1e-3, "adapter_lr": 1e-4, "head_lr": 1e-2,
              "weight_decay": 5e-4, "warmup_steps": 200, "min_lr_ratio": 0.01, "max_steps_per_epoch": None,
              "grad_clip": 5.0},
    "eval": {"epoch_pairs_per_fold": 100, "final_pairs_per_fold": None, "plots_dir": None, "seed": 0},
    "export": None,  # {"version": "v1", "out_dir": "var/models", "calibration_faces": <folder of unseen people>}
}


def merge(base: dict[str, Any], override: dict[str, Any] | None) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# Keys a config may set that have no default above: the model's shape (read by train.build_student), the share of
# mixed faces (training_jobs/mixed_faces.py), the weights of the batch-relation term (training_jobs/losses.py) and
# of the stage-map hints (training_jobs/hints.py), and the switch that keeps every epoch's checkpoint.
OPTIONAL_KEYS = {"keep_every_epoch", "model.kind", "model.activation", "model.width", "model.depth", "model.head",
                "model.context_width", "optim.context_lr",
                "loss.mixed_faces", "loss.relation_weight", "loss.hint_weight"}


def unknown_keys(data: dict[str, Any], base: Any = DEFAULTS, prefix: str = "") -> list[str]:
    """The dotted keys of ``data`` that no default or optional key names. Why: a misspelt key (`dpeth: 3`) would
    otherwise be merged in silently and the run would train the default for an hour."""
    unknown = []
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if dotted in OPTIONAL_KEYS:
            continue
        if not isinstance(base, dict) or key not in base:
            unknown.append(dotted)
        elif isinstance(value, dict) and isinstance(base[key], dict):
            unknown += unknown_keys(value, base[key], f"{dotted}.")
    return unknown


def load_config(path: Path) -> dict[str, Any]:
    """Defaults merged with the file's keys; ValueError names any key the trainer would not read."""
    text = Path(path).read_text()
    if Path(path).suffix in (".yaml", ".yml"):
        import yaml
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:  # not a ValueError: the CLI would print a traceback
            raise ValueError(f"{path}: not YAML ({' '.join(str(exc).split())})") from None
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a training config is a mapping of keys, not {type(data).__name__}")
    unknown = unknown_keys(data)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)} (training_jobs/train_config.py lists them)")
    config = merge(DEFAULTS, data)
    mixed = config["loss"].get("mixed_faces", 0.0)
    if not isinstance(mixed, (int, float)) or not 0 <= mixed <= 1:
        raise ValueError(f"{path}: loss.mixed_faces is the fraction of a batch to mix, in [0, 1], not {mixed!r}")
    if mixed and (config["data"]["cached_views"] or config["teacher"] == "none"):
        raise ValueError(f"{path}: loss.mixed_faces needs the teacher run online (no data.cached_views, a teacher)")
    extra = config["data"]["extra_per_batch"]
    if not isinstance(extra, int) or isinstance(extra, bool) or extra < 0:
        raise ValueError(f"{path}: data.extra_per_batch is a number of faces >= 0, not {extra!r}")
    if extra and (not config["data"]["extra_faces"] or config["data"]["cached_views"]):
        raise ValueError(f"{path}: data.extra_per_batch needs data.extra_faces and no data.cached_views")
    relation = config["loss"].get("relation_weight", 0.0)
    if not isinstance(relation, (int, float)) or relation < 0:
        raise ValueError(f"{path}: loss.relation_weight is a weight >= 0, not {relation!r}")
    if relation and config["teacher"] == "none":
        raise ValueError(f"{path}: loss.relation_weight needs a teacher (the batch's similarities are the teacher's)")
    hint = config["loss"].get("hint_weight", 0.0)
    if not isinstance(hint, (int, float)) or hint < 0:
        raise ValueError(f"{path}: loss.hint_weight is a weight >= 0, not {hint!r}")
    if hint and (config["model"].get("kind") != "sealed-cnn" or not config["data"]["cached_views"]
                 or config["teacher"] != "mobilefacenet"):
        raise ValueError(f"{path}: loss.hint_weight needs model.kind sealed-cnn, data.cached_views and teacher: "
                         "mobilefacenet (the teacher's maps are cached with its embeddings)")
    context = config["model"].get("context_width", 0)
    if not isinstance(context, int) or isinstance(context, bool) or context < 0 or \
            (context and config["model"].get("kind", "frequency-mobilefacenet") != "frequency-mobilefacenet"):
        raise ValueError(f"{path}: model.context_width is a number of channels >= 0 for a frequency-mobilefacenet, "
                         f"not {context!r}")
    context_lr = config["optim"].get("context_lr")
    if context_lr is not None and (not context or not isinstance(context_lr, (int, float)) or context_lr <= 0):
        raise ValueError(f"{path}: optim.context_lr is a learning rate > 0 for model.context_width's layers, "
                         f"not {context_lr!r} (with context_width {context})")
    start = config["model"].get("init_onnx")
    if start and (config["model"].get("kind", "frequency-mobilefacenet") != "frequency-mobilefacenet"
                  or not config["model"]["freeze_backbone_bn"] or not (Path(start).parent / "model.json").is_file()):
        raise ValueError(f"{path}: model.init_onnx needs a frequency-mobilefacenet with freeze_backbone_bn: true (the "
                         "folded BatchNorms are exact in eval mode only) and a model version folder (model.json beside)")
    preset = config["transform"].get("preset")
    if preset not in {**PRESETS, **SCREENED}:  # before any data loads: a bad transform is a one-line error
        raise ValueError(f"{path}: transform.preset {preset!r} is not a transform of inference/transform.py "
                         "(PRESETS or SCREENED)")
    return config


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_spec(config: dict[str, Any]) -> TransformSpec:
    epsilon = config["transform"].get("epsilon")
    # a screened candidate (e.g. a learned noise allocation) may be trained too: that is how it earns a quality gate
    return {**PRESETS, **SCREENED}[config["transform"]["preset"]](None if epsilon in (None, "none") else float(epsilon))
