"""MobileFaceNet, the inverse-DCT adapter, and the ONNX export of model v0 (exported once per session)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from inference import transform as T
from inference.export import EVAL_FOLD, export_version, sample_features
from inference.frequency_model import InverseDctAdapter, build_model_v0
from inference.lfw import lfw_dir, shared_dir
from inference.metadata import ModelMetadata, file_sha256
from inference.mobilefacenet import IMAGENET_MEAN, IMAGENET_STD, WEIGHTS_SUBPATH, load_pretrained
from inference.model_v0 import ensure_model_v0
from inference.runtime import OrtEmbedder

SHARED = shared_dir()
HAVE_DATA = (SHARED / WEIGHTS_SUBPATH).exists() and (lfw_dir(SHARED) / "pairs.txt").exists()
pytestmark = pytest.mark.skipif(not HAVE_DATA, reason=f"MobileFaceNet weights or aligned LFW absent under {SHARED}")
EVAL_PAIRS = 40  # keeps the session export well under a minute; the CLI measures all 600


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def exported_v0(tmp_path_factory) -> Path:
    return export_version("v0", tmp_path_factory.mktemp("models"), SHARED, eval_pairs=EVAL_PAIRS)


def pixel_input(faces: np.ndarray) -> torch.Tensor:
    x = torch.as_tensor(faces, dtype=torch.float32).permute(0, 3, 1, 2) / 255
    return (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


def test_pretrained_weights_load_strictly():
    model = load_pretrained(SHARED)  # strict=True inside
    assert sum(p.numel() for p in model.parameters()) == 999_936
    assert model(torch.zeros(2, 3, 112, 112)).shape == (2, 128)


def test_adapter_rebuilds_the_exact_normalised_pixels():
    faces = np.random.default_rng(0).integers(0, 256, (2, 112, 112, 3), dtype=np.uint8)
    spec = T.make_spec("all", tuple(range(64)), tuple(range(64)), None, clip_sigmas=1e6)
    adapter = InverseDctAdapter(spec)
    rebuilt = adapter(torch.as_tensor(T.clipped(faces, spec), dtype=torch.float32))
    assert torch.allclose(rebuilt, pixel_input(faces), atol=1e-4)
    assert not adapter.learnable and not any(p.requires_grad for p in adapter.parameters())
    adapter.set_learnable(True)
    assert adapter.learnable and adapter.idct.weight.requires_grad


def test_v0_adapter_matches_the_numpy_inverse():
    spec = T.spec_v0(None)
    faces = np.random.default_rng(1).integers(0, 256, (1, 112, 112, 3), dtype=np.uint8)
    features = T.clipped(faces, spec)
    rebuilt = InverseDctAdapter(spec)(torch.as_tensor(features, dtype=torch.float32))
    reference = pixel_input(np.clip(np.rint(T.ycbcr_to_rgb(reference_planes(features, spec))), 0, 255))
    assert (rebuilt - reference).abs().max() < 0.5 / 255 / min(IMAGENET_STD) + 1e-4  # numpy side is rounded


def reference_planes(features: np.ndarray, spec: T.TransformSpec) -> np.ndarray:
    coefficients = np.zeros((features.shape[0], 3, 64, 14, 14))
    colours, freqs = T.kept_index(spec)
    coefficients[:, colours, freqs] = features
    return T.block_idct(coefficients)


def test_v0_embeddings_are_unit_and_flip_symmetric():
    model = build_model_v0(T.spec_v0(None), SHARED)
    features = torch.as_tensor(sample_features(SHARED, T.spec_v0(None), count=2))
    with torch.inference_mode():
        embedding = model(features)
    assert torch.allclose(embedding.norm(dim=1), torch.ones(2), atol=1e-5)


def test_export_writes_model_and_metadata(exported_v0: Path):
    meta = ModelMetadata.load(exported_v0)  # checks the sha256
    raw = json.loads((exported_v0 / "model.json").read_text())
    spec = T.default_spec()
    assert raw["transform"] == spec.to_dict() and raw["transform_id"] == spec.transform_id
    assert raw["params_hash"] == spec.params_hash and raw["sha256"] == file_sha256(exported_v0 / "model.onnx")
    assert meta.version == "v0" and meta.embedding_dim == 128 and meta.onnx_file == "model.onnx"
    assert meta.ort_vs_torch_max_abs_diff < 1e-3
    clean = meta.metrics[f"lfw_fold{EVAL_FOLD}_no_noise"]
    assert clean["num_pairs"] == EVAL_PAIRS and 0.6 < clean["accuracy"] <= 1.0
    assert -1 < meta.threshold < 1


def test_onnx_matches_torch_with_dynamic_batch(exported_v0: Path):
    spec = T.default_spec()
    embedder = OrtEmbedder(exported_v0 / "model.onnx", prefer_gpu=False, intra_op_threads=1)
    assert embedder.input_name == "features" and embedder.input_shape == spec.shape
    assert embedder.session.get_outputs()[0].name == "embedding" and embedder.embedding_dim == 128
    features = sample_features(SHARED, spec, count=3, seed=5)
    model = build_model_v0(spec, SHARED)
    with torch.inference_mode():
        expected = model(torch.from_numpy(features)).numpy()
    for batch in (features[:1], features):
        assert np.abs(embedder.embed(batch) - expected[: len(batch)]).max() < 1e-3
    with pytest.raises(ValueError):
        embedder.embed(features[:, :-1])


def test_ensure_model_v0_reuses_a_valid_export_and_replaces_a_damaged_one(exported_v0: Path, monkeypatch):
    calls = []
    monkeypatch.setattr("inference.export.export_version", lambda *a, **k: calls.append(a))
    assert ensure_model_v0(exported_v0.parent, SHARED) == exported_v0 and not calls
    meta = ModelMetadata.load(exported_v0)
    tampered = json.loads((exported_v0 / "model.json").read_text()) | {"sha256": "0" * 64}
    (exported_v0 / "model.json").write_text(json.dumps(tampered))
    try:
        with pytest.raises(ValueError):
            ModelMetadata.load(exported_v0)
        ensure_model_v0(exported_v0.parent, SHARED)
        assert len(calls) == 1  # a checksum mismatch triggers a new export
    finally:
        meta.save(exported_v0)


def test_models_ensure_with_v0_on_disk_loads_neither_torch_nor_onnx(exported_v0: Path, tmp_path: Path):
    """Every test stack and gateway start runs `privface models ensure`; with v0 already exported it must not pay
    torch's and onnx's imports (3.3 → 1.0 CPU-s, docs/operations.md "`privface models ensure` on every start")."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRIVFACE_")} | {
        "PRIVFACE_ENV": "test", "PRIVFACE_SHARED_DIR": str(SHARED), "PRIVFACE_MODEL_DIR": str(exported_v0.parent),
        "PRIVFACE_DATABASE_URL": f"sqlite:///{tmp_path / 'gateway.db'}", "PRIVFACE_DEFAULT_PRESET": "accurate",
        "PRIVFACE_BUNDLED_MODEL_DIR": "", "PRIVFACE_SECRET_KEY": "k", "PRIVFACE_PARTY0_TOKEN": "a",
        "PRIVFACE_PARTY1_TOKEN": "b"}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "privface", "models", "ensure"], env=env,
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "active model: v0", proc.stdout + proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "inference.model_v0" in imported and "app.services.model_registry" in imported  # the check did run
    assert not imported & {"torch", "onnx", "inference.export"}, sorted(imported & {"torch", "onnx", "inference.export"})
